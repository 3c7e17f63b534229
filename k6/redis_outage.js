// Redis stopped mid-run and restarted: reads through the gateway and direct
// reads at an instance must not fail once (L1 and Postgres serve while the
// breaker is open). `make k6 SCENARIO=redis_outage` stops the stack's own
// Redis (never the machine's) a third into the run and starts it again at
// two thirds (scripts/stack.sh redis-outage).
import http from 'k6/http';
import { check } from 'k6';
import { FEDERATED, gql } from './lib.js';

const GATEWAY = __ENV.URL || 'http://127.0.0.1:4000/';
const DIRECT = __ENV.DIRECT || 'http://127.0.0.1:4001/graphql';

export const options = {
  scenarios: { outage: { executor: 'constant-vus', vus: Number(__ENV.VUS || 16), duration: __ENV.DURATION || '30s' } },
  thresholds: { http_req_failed: ['rate==0'], checks: ['rate==1'], http_req_duration: ['p(99)<1000'] },
  summaryTrendStats: ['avg', 'p(50)', 'p(95)', 'p(99)', 'max'],
};

export default function () {
  const k = 1 + Math.floor(Math.random() * 200);
  const direct = gql(http, DIRECT, `{ offer(id: "offer-${String(k).padStart(6, '0')}") { rating { count } reviews(first: 5) { edges { node { id } } } } }`);
  check(direct.res, { 'direct read ok': () => direct.res.status === 200 && direct.body && !direct.body.errors });
  const federated = gql(http, GATEWAY, FEDERATED, { first: 5, n: 2 });
  check(federated.res, { 'federated read ok': () => federated.res.status === 200 && federated.body && !federated.body.errors });
}
