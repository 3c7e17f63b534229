// Shared helpers for the k6 scenarios: Zipf-drawn offers, the federated
// _entities query, and HS256 tokens for mutations.
import crypto from 'k6/crypto';
import encoding from 'k6/encoding';

export const QUERY =
  'query($representations: [_Any!]!) { _entities(representations: $representations) { ... on Offer { id rating { average count distribution } reviews(first: 5) { totalCount edges { node { id rating text author { id } } } } } } }';

export function zipf(n) {
  const cdf = new Float64Array(n);
  let total = 0;
  for (let k = 1; k <= n; k++) {
    total += 1 / k;
    cdf[k - 1] = total;
  }
  return () => {
    const u = Math.random() * total;
    let lo = 0;
    let hi = n - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (cdf[mid] < u) lo = mid + 1;
      else hi = mid;
    }
    return lo + 1;
  };
}

export const offerId = (k) => `offer-${String(k).padStart(6, '0')}`;

export function entitiesBody(draw, count) {
  const representations = [];
  for (let i = 0; i < count; i++) representations.push({ __typename: 'Offer', id: offerId(draw()) });
  return JSON.stringify({ query: QUERY, variables: { representations } });
}

export function jwt(secret, claims) {
  const enc = (obj) => encoding.b64encode(JSON.stringify(obj), 'rawurl');
  const head = `${enc({ alg: 'HS256', typ: 'JWT' })}.${enc(claims)}`;
  const sig = encoding.b64encode(crypto.hmac('sha256', secret, head, 'binary'), 'rawurl');
  return `${head}.${sig}`;
}

export const JSON_HEADERS = { 'content-type': 'application/json' };

// Load from many clients, as a public API gets it: the stack trusts
// 127.0.0.1 as a proxy, so each request names one of CLIENTS addresses in
// X-Forwarded-For and the per-client rate limits apply per address (one
// k6 process would otherwise be a single client, limited to 200 reads/s).
const CLIENTS = Number(__ENV.CLIENTS || 1000);
export function clientHeaders() {
  const n = (__VU * 7919 + __ITER) % CLIENTS;
  return { 'x-forwarded-for': `10.${(n >> 8) & 255}.${n & 255}.1` };
}

// A GraphQL POST; returns the parsed body (null when it is not JSON).
export function gql(http, url, query, variables, headers = {}) {
  const res = http.post(url, JSON.stringify({ query, variables }), {
    headers: { ...JSON_HEADERS, ...clientHeaders(), ...headers },
  });
  let body = null;
  try {
    body = res.json();
  } catch (_) {
    body = null;
  }
  return { res, body };
}

export const token = (secret, sub, roles = []) =>
  jwt(secret, { sub, roles, exp: Math.floor(Date.now() / 1000) + 3600 });

// The federated read a client app sends through the gateway: offers from the
// offers subgraph, ratings and a page of reviews (first: $n) from ours,
// authors' names back from offers.
export const FEDERATED =
  'query Offers($first: Int!, $n: Int!) { offers(first: $first) { id title rating { average count } reviews(first: $n) { totalCount edges { node { id rating text author { id name } } } } } }';
