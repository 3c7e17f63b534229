// Invalidation lag across instances: steady writes (updateReview by a
// moderator) on instance A while readers hammer the same offers on B and C.
// The lag itself (commit → L1 eviction on each instance) is read from B's and
// C's /metrics (ugc_invalidation_lag_seconds) by scripts/bench.sh.
//   k6 run -e A=… -e B=… -e C=… -e SECRET=… -e REVIEWS=id,id,… k6/invalidation_lag.js
import http from 'k6/http';
import { check } from 'k6';
import { Trend } from 'k6/metrics';
import { jwt } from './lib.js';

const [A, B, C] = [__ENV.A, __ENV.B, __ENV.C];
const REVIEWS = (__ENV.REVIEWS || '').split(',');
const OFFERS = (__ENV.LAG_OFFERS || 'offer-000001').split(',');
const headers = { 'content-type': 'application/json' };
// Mutation latency: with the write visibility protocol on, it includes the
// wait for every instance's acknowledgement.
const writeMs = new Trend('write_ms', true);
const token = jwt(__ENV.SECRET, { sub: 'bench-moderator', roles: ['moderator'], exp: Math.floor(Date.now() / 1000) + 3600 });

export const options = {
  scenarios: {
    writes: { executor: 'constant-arrival-rate', exec: 'write', rate: Number(__ENV.WRITES_PER_SEC || 20), timeUnit: '1s', duration: __ENV.DURATION || '15s', preAllocatedVUs: 4 },
    reads: { executor: 'constant-vus', exec: 'read', vus: 8, duration: __ENV.DURATION || '15s' },
  },
  thresholds: { 'http_req_failed': ['rate<0.001'], 'checks': ['rate>0.999'] },
  summaryTrendStats: ['avg', 'p(50)', 'p(95)', 'p(99)', 'max'],
};

export function write() {
  const id = REVIEWS[Math.floor(Math.random() * REVIEWS.length)];
  const body = JSON.stringify({
    query: 'mutation($id: ID!, $t: String!) { updateReview(id: $id, input: { text: $t }) { id } }',
    variables: { id, t: `edited at ${Date.now()}` },
  });
  const res = http.post(A, body, { headers: { ...headers, authorization: `Bearer ${token}` } });
  writeMs.add(res.timings.duration);
  check(res, { 'write ok': (r) => r.status === 200 && !r.json('errors') });
}

export function read() {
  const offer = OFFERS[Math.floor(Math.random() * OFFERS.length)];
  const body = JSON.stringify({ query: `{ offer(id: "${offer}") { rating { count } reviews(first: 10) { edges { node { id text } } } } }` });
  const res = http.post(__VU % 2 ? B : C, body, { headers });
  check(res, { 'read ok': (r) => r.status === 200 && !r.json('errors') });
}
