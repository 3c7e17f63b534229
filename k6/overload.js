// A burst far beyond capacity (many VUs, no think time) at one instance with a
// low concurrency limit: what is admitted keeps its latency, the rest is shed
// at once with 503 + Retry-After, nothing else fails.
//   k6 run -e URL=http://127.0.0.1:4001/graphql -e VUS=300 -e DURATION=10s k6/overload.js
import http from 'k6/http';
import { check } from 'k6';
import { Counter, Trend } from 'k6/metrics';
import { entitiesBody, zipf } from './lib.js';

const URL = __ENV.URL || 'http://127.0.0.1:4001/graphql';
const draw = zipf(Number(__ENV.OFFERS || 10000));
const admitted = new Trend('admitted_duration', true);
const shedDuration = new Trend('shed_duration', true);
const shed = new Counter('shed');
const failed = new Counter('failed');

export const options = {
  scenarios: {
    burst: { executor: 'constant-vus', vus: Number(__ENV.VUS || 300), duration: __ENV.DURATION || '10s' },
  },
  thresholds: {
    checks: ['rate==1'],
    failed: ['count==0'],
    admitted_duration: ['p(99)<250'],
  },
  summaryTrendStats: ['avg', 'p(50)', 'p(95)', 'p(99)', 'max'],
};

export default function () {
  // Each VU is one client behind the trusted proxy (own rate-limit key).
  const headers = { 'content-type': 'application/json', 'x-forwarded-for': `10.9.${__VU >> 8}.${__VU & 255}` };
  const res = http.post(URL, entitiesBody(draw, 20), { headers, responseCallback: http.expectedStatuses(200, 503) });
  const ok = check(res, {
    'admitted or shed': (r) => r.status === 200 || (r.status === 503 && r.headers['Retry-After'] === '1'),
  });
  if (!ok) failed.add(1);
  if (res.status === 200) admitted.add(res.timings.duration);
  if (res.status === 503) {
    shed.add(1);
    shedDuration.add(res.timings.duration);
  }
}

export function handleSummary(data) {
  const m = data.metrics;
  const trend = (t) => (t ? { p50: t.values['p(50)'], p99: t.values['p(99)'] } : null);
  const out = {
    requests: m.http_reqs.values.count,
    admitted: m.http_reqs.values.count - (m.shed ? m.shed.values.count : 0) - (m.failed ? m.failed.values.count : 0),
    shed: m.shed ? m.shed.values.count : 0,
    failed: m.failed ? m.failed.values.count : 0,
    admitted_ms: trend(m.admitted_duration),
    shed_ms: trend(m.shed_duration),
  };
  return { stdout: `${JSON.stringify(out)}\n` };
}
