// Federated reads through the Apollo gateway of the local stack (make stack):
// offers come from the offers subgraph, ratings and pages of reviews from
// ugc-subgraph (both instances in turn), authors' names back from offers.
//   make k6 SCENARIO=federated            (URL=http://127.0.0.1:4000/)
import http from 'k6/http';
import { check } from 'k6';
import { FEDERATED, gql } from './lib.js';

const URL = __ENV.URL || 'http://127.0.0.1:4000/';

export const options = {
  scenarios: {
    federated: { executor: 'constant-vus', vus: Number(__ENV.VUS || 16), duration: __ENV.DURATION || '20s' },
  },
  thresholds: {
    http_req_failed: ['rate<0.001'],
    checks: ['rate>0.999'],
    http_req_duration: ['p(99)<250'],
  },
  summaryTrendStats: ['avg', 'p(50)', 'p(95)', 'p(99)', 'max'],
};

export default function () {
  const { res, body } = gql(http, URL, FEDERATED, { first: 10, n: 1 + (__ITER % 5) });
  check(res, {
    'no GraphQL errors': () => res.status === 200 && body && !body.errors,
    'ratings and reviews joined': () => body && body.data.offers.length === 10 && body.data.offers[0].rating !== null,
  });
}
