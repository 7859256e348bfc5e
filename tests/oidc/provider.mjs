// A real OAuth 2.0 authorization server for tests/it/consent.rs: the npm package
// oidc-provider (installed by .ci/run into target/oidc) on a free loopback port, with the
// authorization code grant + PKCE, the device authorization grant (RFC 8628), refresh-token
// rotation and revocation switched on, and its development login/consent pages for the tests
// to walk through with plain HTTP requests.
//
// It also serves a protected API at /api/whoami that answers 200 only to an access token the
// provider issued and still honours, so the tests see exactly what a vendor's API would.
//
// The device grant's polling is held to RFC 8628 §3.5 as a strict vendor would: a poll
// sooner than the interval since the previous one is answered `slow_down`, and every
// `slow_down` adds five seconds to the interval. oidc-provider itself sends no `interval` and
// never `slow_down`, so this file adds both around it.
//
// Usage: node provider.mjs MODULES_DIR REDIRECT_URI ACCESS_TOKEN_SECONDS [POLL_INTERVAL_SECONDS]
// Prints `listening PORT` on stdout once it accepts connections.

import { pathToFileURL } from 'node:url';
import path from 'node:path';

const [modules, redirectUri, accessTtl, pollInterval = '1'] = process.argv.slice(2);
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
      grant_types: [
        'authorization_code',
        'refresh_token',
        'urn:ietf:params:oauth:grant-type:device_code',
      ],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_post',
    },
  ],
  pkce: { required: () => true },
  features: {
    devInteractions: { enabled: true },
    deviceFlow: { enabled: true },
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
    DeviceCode: 600,
  },
});
// Plain HTTP on loopback: the tests play the browser without TLS.
provider.proxy = false;

// What the tests count: calls to the token endpoint by grant type, and refusals.
const stats = {
  token_calls: 0,
  refreshes: 0,
  codes: 0,
  devices: 0,
  invalid_grants: 0,
  device_polls: 0,
  slow_downs: 0,
  too_fast: 0,
  // Token requests still being answered (one whose caller died is still finished here).
  in_flight: 0,
};
const grants = new Set();
provider.on('grant.success', (ctx) => {
  if (ctx.oidc.params.grant_type === 'refresh_token') stats.refreshes += 1;
  if (ctx.oidc.params.grant_type === 'authorization_code') stats.codes += 1;
  if (ctx.oidc.params.grant_type === 'urn:ietf:params:oauth:grant-type:device_code') {
    stats.devices += 1;
  }
});
// The polling interval this vendor states, and the pacing it holds clients to.
const pacing = { interval: Number(pollInterval) * 1000, lastPoll: 0, slowDownNext: false };
provider.on('device_authorization.success', (ctx, body) => {
  body.interval = Number(pollInterval);
  pacing.interval = Number(pollInterval) * 1000;
  pacing.lastPoll = Date.now();
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
  // The next device poll is answered `slow_down` whatever its timing (a vendor under load).
  if (req.url === '/__test/slow-down' && req.method === 'POST') {
    pacing.slowDownNext = true;
    send(res, 200, {});
    return;
  }
  if (req.url.startsWith('/token')) {
    stats.token_calls += 1;
    stats.in_flight += 1;
    res.on('close', () => { stats.in_flight -= 1; });
  }
  // While a device authorization is pending every token call is a poll (the device tests
  // make no other); RFC 8628 §3.5 pacing is enforced on them.
  if (req.url === '/token' && pacing.lastPoll && !stats.devices) {
    stats.device_polls += 1;
    const now = Date.now();
    const early = now - pacing.lastPoll < pacing.interval - 50;
    pacing.lastPoll = now;
    if (early || pacing.slowDownNext) {
      if (early) stats.too_fast += 1;
      pacing.slowDownNext = false;
      pacing.interval += 5000;
      stats.slow_downs += 1;
      req.resume();
      send(res, 400, { error: 'slow_down', error_description: 'poll less often' });
      return;
    }
  }
  callback(req, res);
});

// The tests read this one line and close the pipe: anything the package prints later goes
// to stderr instead of killing the process with EPIPE.
process.stdout.write(`listening ${port}\n`);
console.log = console.info = console.error;
