// A stampede: every round, all VUs ask for the same cold offer at the same
// instant (a different, never-read offer each round). Single-flight (one
// instance) and the load lease (across instances) must turn each round into
// one load per key: the SQL statements per round are printed from /metrics.
//   make k6 SCENARIO=stampede             (URL=http://127.0.0.1:4001/graphql)
import http from 'k6/http';
import { check, sleep } from 'k6';
import { clientHeaders, offerId } from './lib.js';

const URL = __ENV.URL || 'http://127.0.0.1:4001/graphql';
const METRICS = URL.replace(/\/graphql$/, '/metrics');
const ROUND_MS = 1000;
const ROUNDS = Number(__ENV.ROUNDS || 10);
const VUS = Number(__ENV.VUS || 100);
// Far down the Zipf tail, and moved on every run: cold.
const FIRST = 500 + (Math.floor(Date.now() / 1000) % 400);

export const options = {
  scenarios: {
    stampede: { executor: 'per-vu-iterations', vus: VUS, iterations: ROUNDS, maxDuration: '60s' },
  },
  thresholds: { http_req_failed: ['rate==0'], checks: ['rate==1'], http_req_duration: ['p(99)<1000'] },
  summaryTrendStats: ['avg', 'p(50)', 'p(95)', 'p(99)', 'max'],
};

// Read-path statements only (heartbeats, visibility ticks and relay polls
// run beside any load).
const READS = ['offer_ratings', 'offer_review_pages', 'author_review_counts', 'author_review_pages', 'reviews_by_ids'];
const statements = () => {
  const text = http.get(METRICS).body;
  return text
    .split('\n')
    .filter((l) => l.startsWith('ugc_sql_statements_total') && READS.some((s) => l.includes(`statement="${s}"`)))
    .reduce((n, l) => n + Number(l.split(' ').pop()), 0);
};

export function setup() {
  return { before: statements(), start: Date.now() + 1500 };
}

export default function (data) {
  // Wait for this round's instant, then all at once.
  const at = data.start + __ITER * ROUND_MS;
  const wait = at - Date.now();
  if (wait > 0) sleep(wait / 1000);
  const id = offerId(FIRST + __ITER);
  const res = http.post(URL, JSON.stringify({ query: `{ offer(id: "${id}") { rating { count average } reviews(first: 10) { edges { node { id } } } } }` }),
    { headers: { 'content-type': 'application/json', ...clientHeaders() } });
  check(res, { 'no errors': (r) => r.status === 200 && !r.json('errors') });
}

export function teardown(data) {
  const per = (statements() - data.before) / ROUNDS;
  console.log(`stampede: ${VUS} concurrent readers per round, ${per.toFixed(1)} SQL statements per round (per cold key)`);
}
