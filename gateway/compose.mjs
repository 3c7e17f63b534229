// Static composition of the checked-in subgraph SDL with the offers subgraph,
// with @apollo/composition: proves schema/ugc-subgraph.graphql composes
// without any running service.
//
//   node compose.mjs [OUT]   writes the supergraph SDL to OUT when given
import { readFileSync, writeFileSync } from 'node:fs';
import { composeServices } from '@apollo/composition';
import { parse } from 'graphql';

const read = (rel) => readFileSync(new URL(rel, import.meta.url), 'utf8');
const result = composeServices([
  { name: 'offers', url: 'http://127.0.0.1:4002/graphql', typeDefs: parse(read('./offers.graphql')) },
  { name: 'ugc', url: 'http://127.0.0.1:4001/graphql', typeDefs: parse(read('../schema/ugc-subgraph.graphql')) },
]);
if (result.errors?.length) {
  for (const e of result.errors) console.error(`composition error: ${e.message}`);
  process.exit(1);
}
if (process.argv[2]) writeFileSync(process.argv[2], result.supergraphSdl);
console.log(`composition ok (${result.hints?.length ?? 0} hints)`);
