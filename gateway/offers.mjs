// A tiny "offers" subgraph owning Offer { id title } and User { id name }.
// Titles and names are derived from the ids, so any id resolves.
import { readFileSync } from 'node:fs';
import { ApolloServer } from '@apollo/server';
import { startStandaloneServer } from '@apollo/server/standalone';
import { buildSubgraphSchema } from '@apollo/subgraph';
import { parse } from 'graphql';

const typeDefs = parse(readFileSync(new URL('./offers.graphql', import.meta.url), 'utf8'));
const offer = (id) => ({ id, title: `Title of ${id}` });
const user = (id) => ({ id, name: `Name of ${id}` });
const resolvers = {
  Query: {
    offers: (_, { first }) =>
      Array.from({ length: Math.max(0, Math.min(first ?? 10, 1000)) }, (_, i) =>
        offer(`offer-${String(i + 1).padStart(6, '0')}`)),
  },
  Offer: { __resolveReference: ({ id }) => offer(id) },
  User: { __resolveReference: ({ id }) => user(id) },
};

const server = new ApolloServer({ schema: buildSubgraphSchema([{ typeDefs, resolvers }]) });
const port = Number(process.env.OFFERS_PORT ?? 4002);
const { url } = await startStandaloneServer(server, { listen: { host: process.env.OFFERS_HOST ?? '127.0.0.1', port } });
console.log(`offers subgraph ready at ${url}`);
