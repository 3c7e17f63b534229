// The gateway's hottest request, straight at one subgraph instance: 20
// Zipf-drawn offers with rating and first 5 reviews. Thresholds fail the
// run on errors or a slow tail.
//   k6 run -e URL=http://127.0.0.1:4001/graphql -e OFFERS=10000 k6/entities.js
import http from 'k6/http';
import { check } from 'k6';
import { clientHeaders, entitiesBody, zipf } from './lib.js';

const URL = __ENV.URL || 'http://127.0.0.1:4001/graphql';
const draw = zipf(Number(__ENV.OFFERS || 10000));

export const options = {
  scenarios: {
    entities: { executor: 'constant-vus', vus: Number(__ENV.VUS || 16), duration: __ENV.DURATION || '15s' },
  },
  thresholds: {
    http_req_failed: ['rate<0.001'],
    checks: ['rate>0.999'],
    http_req_duration: ['p(99)<100'],
  },
  summaryTrendStats: ['avg', 'p(50)', 'p(95)', 'p(99)', 'max'],
};

export default function () {
  const res = http.post(URL, entitiesBody(draw, 20), { headers: { 'content-type': 'application/json', ...clientHeaders() } });
  check(res, { 'no GraphQL errors': (r) => r.status === 200 && !r.json('errors') });
}
