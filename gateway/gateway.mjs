// A real Apollo gateway over ugc-subgraph and the offers subgraph.
//
//   UGC_URL       ugc-subgraph endpoint   (default http://127.0.0.1:4001/graphql)
//   OFFERS_URL    offers endpoint         (default http://127.0.0.1:4002/graphql)
//   GATEWAY_PORT  where to listen         (default 4000)
//
// Composes at start-up with IntrospectAndCompose (each subgraph's
// `_service { sdl }`) and forwards the client's Authorization header to every
// subgraph, as a production gateway would.
import { ApolloServer } from '@apollo/server';
import { startStandaloneServer } from '@apollo/server/standalone';
import { ApolloGateway, IntrospectAndCompose, RemoteGraphQLDataSource } from '@apollo/gateway';

class ForwardAuthorization extends RemoteGraphQLDataSource {
  willSendRequest({ request, context }) {
    if (context.authorization) request.http.headers.set('authorization', context.authorization);
  }
}

const gateway = new ApolloGateway({
  supergraphSdl: new IntrospectAndCompose({
    subgraphs: [
      { name: 'offers', url: process.env.OFFERS_URL ?? 'http://127.0.0.1:4002/graphql' },
      { name: 'ugc', url: process.env.UGC_URL ?? 'http://127.0.0.1:4001/graphql' },
    ],
  }),
  buildService: ({ url }) => new ForwardAuthorization({ url }),
});

const server = new ApolloServer({ gateway });
const port = Number(process.env.GATEWAY_PORT ?? 4000);
const { url } = await startStandaloneServer(server, {
  listen: { host: '127.0.0.1', port },
  context: async ({ req }) => ({ authorization: req.headers.authorization }),
});
console.log(`gateway ready at ${url}`);
