// A write mix through the gateway: 95 % federated reads, 5 % mutations
// (each VU reviews its own offer once, then edits the review) with valid
// JWTs. After every acknowledged edit, the next read of that review through
// the gateway (either instance) must show it: read-your-write, counted.
//   make k6 SCENARIO=write_mix            (URL=…, SECRET=…)
import http from 'k6/http';
import { check } from 'k6';
import { Counter, Trend } from 'k6/metrics';
import { FEDERATED, gql, token } from './lib.js';

const URL = __ENV.URL || 'http://127.0.0.1:4000/';
const SECRET = __ENV.SECRET || 'dev-only-secret-change-me-0123456789';
const RUN = __ENV.RUN || String(Date.now());
const WRITE_RATIO = Number(__ENV.WRITE_RATIO || 0.05);
const staleAfterWrite = new Counter('read_your_write_violations');
const checkedAfterWrite = new Counter('read_your_write_checks');
const writeMs = new Trend('write_ms', true);

export const options = {
  scenarios: {
    mix: { executor: 'constant-vus', vus: Number(__ENV.VUS || 16), duration: __ENV.DURATION || '20s' },
  },
  thresholds: {
    http_req_failed: ['rate<0.001'],
    checks: ['rate>0.999'],
    read_your_write_violations: ['count==0'],
    http_req_duration: ['p(99)<500'],
  },
  summaryTrendStats: ['avg', 'p(50)', 'p(95)', 'p(99)', 'max'],
};

let mine = null; // this VU's review id
const auth = () => ({ authorization: `Bearer ${token(SECRET, `k6-${RUN}-vu${__VU}`)}` });

function write() {
  const text = `k6 ${RUN} vu ${__VU} iteration ${__ITER}`;
  let out;
  if (mine === null) {
    out = gql(http, URL, 'mutation($i: CreateReviewInput!) { createReview(input: $i) { id text } }',
      { i: { offerId: `offer-k6-${RUN}-${__VU}`, rating: 4, text } }, auth());
    mine = out.body && out.body.data && out.body.data.createReview ? out.body.data.createReview.id : null;
  } else {
    out = gql(http, URL, 'mutation($id: ID!, $t: String!) { updateReview(id: $id, input: { text: $t }) { id text } }',
      { id: mine, t: text }, auth());
  }
  writeMs.add(out.res.timings.duration);
  const ok = check(out.res, { 'write acknowledged': () => out.res.status === 200 && out.body && !out.body.errors });
  if (!ok || mine === null) return;
  // Acknowledged: every instance must show it now.
  const read = gql(http, URL, 'query($id: ID!) { review(id: $id) { text } }', { id: mine });
  const seen = read.body && read.body.data && read.body.data.review ? read.body.data.review.text : null;
  checkedAfterWrite.add(1);
  if (seen !== text) staleAfterWrite.add(1);
  check(read.res, { 'read after write ok': () => read.res.status === 200 && read.body && !read.body.errors });
}

export default function () {
  if (Math.random() < WRITE_RATIO) {
    write();
    return;
  }
  const { res, body } = gql(http, URL, FEDERATED, { first: 10, n: 3 });
  check(res, { 'read ok': () => res.status === 200 && body && !body.errors });
}
