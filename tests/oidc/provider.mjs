// A real OAuth 2.0 authorization server for tests/it/consent.rs: the npm package
// oidc-provider (installed by .ci/run into target/oidc) on a free loopback port, with the
// authorization code grant + PKCE, refresh-token rotation and revocation switched on, and its
// development login/consent pages for the tests to walk through with plain HTTP requests.
//
// It also serves a protected API at /api/whoami that answers 200 only to an access token the
// provider issued and still honours, so the tests see exactly what a vendor's API would.
//
// Usage: node provider.mjs MODULES_DIR REDIRECT_URI ACCESS_TOKEN_SECONDS
// Prints `listening PORT` on stdout once it accepts connections.

import { pathToFileURL } from 'node:url';
import path from 'node:path';

const [modules, redirectUri, accessTtl] = process.argv.slice(2);
const { default: Provider } = await import(
  pathToFileURL(path.join(modules, 'oidc-provider', 'lib', 'index.js')).href
);

const server = (await import('node:http')).createServer();
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const port = server.address().port;
const issuer = `http://127.0.0.1:${port}`;

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: 'app',
      client_secret: 'app-secret-value',
      redirect_uris: [redirectUri],
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_post',
    },
  ],
  pkce: { required: () => true },
  features: {
    devInteractions: { enabled: true },
    revocation: { enabled: true },
  },
  // Every refresh answers a new refresh token and kills the one presented; presenting a
  // dead one revokes the whole grant — the strictest vendors behave so.
  rotateRefreshToken: true,
  issueRefreshToken: async () => true,
  ttl: {
    AccessToken: Number(accessTtl),
    RefreshToken: 24 * 3600,
    Grant: 24 * 3600,
    Session: 24 * 3600,
    Interaction: 3600,
  },
});
// Plain HTTP on loopback: the tests play the browser without TLS.
provider.proxy = false;

// What the tests count: calls to the token endpoint by grant type, and refusals.
const stats = { token_calls: 0, refreshes: 0, codes: 0, invalid_grants: 0 };
const grants = new Set();
provider.on('grant.success', (ctx) => {
  if (ctx.oidc.params.grant_type === 'refresh_token') stats.refreshes += 1;
  if (ctx.oidc.params.grant_type === 'authorization_code') stats.codes += 1;
});
provider.on('grant.error', (ctx, err) => {
  if (err.error === 'invalid_grant') stats.invalid_grants += 1;
});
provider.on('grant.saved', (grant) => grants.add(grant.jti));

const send = (res, status, body) => {
  res.statusCode = status;
  res.setHeader('content-type', 'application/json');
  res.end(JSON.stringify(body));
};

const callback = provider.callback();
server.on('request', async (req, res) => {
  if (req.url === '/api/whoami') {
    const auth = req.headers.authorization || '';
    const token = auth.startsWith('Bearer ') ? auth.slice(7) : '';
    const found = token ? await provider.AccessToken.find(token) : undefined;
    send(res, found ? 200 : 401, found ? { sub: found.accountId } : { error: 'invalid_token' });
    return;
  }
  if (req.url === '/__test/stats') {
    send(res, 200, stats);
    return;
  }
  // The person withdraws consent at the vendor: every grant (and so every refresh token
  // issued under it) is gone.
  if (req.url === '/__test/revoke-grants' && req.method === 'POST') {
    for (const jti of grants) {
      const grant = await provider.Grant.find(jti);
      if (grant) await grant.destroy();
    }
    grants.clear();
    send(res, 200, {});
    return;
  }
  if (req.url.startsWith('/token')) stats.token_calls += 1;
  callback(req, res);
});

process.stdout.write(`listening ${port}\n`);
