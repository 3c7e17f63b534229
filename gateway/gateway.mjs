// A real Apollo gateway over ugc-subgraph and the offers subgraph.
//
//   UGC_URL       ugc-subgraph endpoint   (default http://127.0.0.1:4001/graphql);
//                 several, comma-separated, are used in turn (one deployment
//                 of several instances, as behind a load balancer)
//   OFFERS_URL    offers endpoint         (default http://127.0.0.1:4002/graphql)
//   GATEWAY_HOST  address to listen on    (default 127.0.0.1; 0.0.0.0 in a container)
//   GATEWAY_PORT  where to listen         (default 4000)
//
// Composes at start-up with IntrospectAndCompose (each subgraph's
// `_service { sdl }`) and forwards the client's Authorization header to every
// subgraph, as a production gateway would. It also appends the address it
// received the request from to X-Forwarded-For, so that a subgraph that
// trusts this gateway (UGC_TRUSTED_PROXIES) rate-limits the real client,
// not the gateway.
import { ApolloServer } from '@apollo/server';
import { startStandaloneServer } from '@apollo/server/standalone';
import { ApolloGateway, IntrospectAndCompose, RemoteGraphQLDataSource } from '@apollo/gateway';

class ForwardAuthorization extends RemoteGraphQLDataSource {
  constructor({ url, urls }) {
    super({ url });
    this.urls = urls ?? [url];
    this.next = 0;
  }

  willSendRequest({ request, context }) {
    if (this.urls.length > 1) {
      request.http.url = this.urls[this.next];
      this.next = (this.next + 1) % this.urls.length;
    }
    if (context.authorization) request.http.headers.set('authorization', context.authorization);
    if (context.forwardedFor) request.http.headers.set('x-forwarded-for', context.forwardedFor);
  }
}

const ugcUrls = (process.env.UGC_URL ?? 'http://127.0.0.1:4001/graphql').split(',').map((u) => u.trim()).filter(Boolean);

// The incoming X-Forwarded-For (whatever proxies before us wrote) plus our peer.
function forwardedFor(req) {
  const peer = (req.socket.remoteAddress ?? '').replace(/^::ffff:/, '');
  return [req.headers['x-forwarded-for'], peer].filter(Boolean).join(', ');
}

const gateway = new ApolloGateway({
  supergraphSdl: new IntrospectAndCompose({
    subgraphs: [
      { name: 'offers', url: process.env.OFFERS_URL ?? 'http://127.0.0.1:4002/graphql' },
      { name: 'ugc', url: ugcUrls[0] },
    ],
  }),
  buildService: ({ name, url }) => new ForwardAuthorization({ url, urls: name === 'ugc' ? ugcUrls : undefined }),
});

const server = new ApolloServer({ gateway });
const port = Number(process.env.GATEWAY_PORT ?? 4000);
const { url } = await startStandaloneServer(server, {
  listen: { host: process.env.GATEWAY_HOST ?? '127.0.0.1', port },
  context: async ({ req }) => ({ authorization: req.headers.authorization, forwardedFor: forwardedFor(req) }),
});
console.log(`gateway ready at ${url}`);
