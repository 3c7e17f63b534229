// A hot key: every VU reads the same offer (the most reviewed one) as fast as
// it can, directly at one instance. It must stay in L1 (hot-key promotion)
// and keep the tail flat.
//   make k6 SCENARIO=hot_key              (URL=http://127.0.0.1:4001/graphql)
import http from 'k6/http';
import { check } from 'k6';
import { clientHeaders } from './lib.js';

const URL = __ENV.URL || 'http://127.0.0.1:4001/graphql';
const OFFER = __ENV.OFFER || 'offer-000001';
const BODY = JSON.stringify({
  query: `{ offer(id: "${OFFER}") { rating { average count distribution } reviews(first: 10) { totalCount edges { node { id rating text } } } } }`,
});

export const options = {
  scenarios: { hot: { executor: 'constant-vus', vus: Number(__ENV.VUS || 32), duration: __ENV.DURATION || '15s' } },
  thresholds: { http_req_failed: ['rate==0'], checks: ['rate>0.999'], http_req_duration: ['p(99)<50'] },
  summaryTrendStats: ['avg', 'p(50)', 'p(95)', 'p(99)', 'max'],
};

export default function () {
  const res = http.post(URL, BODY, { headers: { 'content-type': 'application/json', ...clientHeaders() } });
  check(res, { 'no errors': (r) => r.status === 200 && !r.json('errors') });
}
