// Steady createReview writes at RATE per second on Zipf-drawn offers, each
// by a new user (no CONFLICT), beside a read load run by the bench: the
// hottest offers are the most written. Used by `make bench` (mixed run).
//   k6 run -e URL=… -e SECRET=… -e RATE=100 -e DURATION=20s k6/write_rate.js
import http from 'k6/http';
import { check } from 'k6';
import { gql, offerId, token, zipf } from './lib.js';

const URL = __ENV.URL || 'http://127.0.0.1:4001/graphql';
const RUN = __ENV.RUN || String(Date.now());
const draw = zipf(Number(__ENV.OFFERS || 10000));

export const options = {
  scenarios: {
    writes: {
      executor: 'constant-arrival-rate',
      rate: Number(__ENV.RATE || 100),
      timeUnit: '1s',
      duration: __ENV.DURATION || '20s',
      preAllocatedVUs: 8,
      maxVUs: 32,
    },
  },
  thresholds: { http_req_failed: ['rate<0.001'], checks: ['rate>0.999'] },
  summaryTrendStats: ['avg', 'p(50)', 'p(95)', 'p(99)', 'max'],
};

export default function () {
  const who = `w-${RUN}-${__VU}-${__ITER}`;
  const { res, body } = gql(http, URL, 'mutation($i: CreateReviewInput!) { createReview(input: $i) { id } }',
    { i: { offerId: offerId(draw()), rating: 1 + (__ITER % 5), text: `bench write ${who}` } },
    { authorization: `Bearer ${token(__ENV.SECRET, who)}` });
  check(res, { 'write ok': () => res.status === 200 && body && !body.errors });
}
