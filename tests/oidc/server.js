// Test-only OAuth 2.0 / OpenID Connect authorization server for the oauth2mci
// integration tests, built on oidc-provider. See README.md for usage.
//
//   node server.js CONFIG_JSON_PATH
//
// Contract with the test harness: stdout carries exactly one line, a JSON
// object {"issuer": ..., "port": ...}, printed once the server is listening.
// Everything else goes to stderr.

import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';

// oidc-provider prints NOTICEs with console.info (i.e. to stdout). Reroute all
// console output to stderr *before* loading it, so stdout stays machine-readable.
for (const method of ['log', 'info', 'debug']) console[method] = console.error;
const { default: Provider } = await import('oidc-provider');
const { TestAdapter, revokeAllForClient } = await import('./adapter.js');

// Exit promptly on signals: this process holds nothing worth flushing.
for (const signal of ['SIGTERM', 'SIGINT', 'SIGHUP']) process.on(signal, () => process.exit(0));

function fail(message) {
  console.error(`oidc test server: ${message}`);
  process.exit(2);
}

// ---------------------------------------------------------------- config ---

const configPath = process.argv[2];
if (!configPath) fail('usage: node server.js CONFIG_JSON_PATH');

let config;
try {
  config = JSON.parse(fs.readFileSync(configPath, 'utf8'));
} catch (err) {
  fail(`cannot read config ${configPath}: ${err.message}`);
}
if (!Array.isArray(config.clients) || config.clients.length === 0) {
  fail('config.clients must be a non-empty array of client metadata');
}

const DAY = 24 * 60 * 60;
const accessTokenTtl = config.access_token_ttl ?? 3600;
const refreshTokenTtl = config.refresh_token_ttl ?? 14 * DAY;
const rotateRefreshToken = config.rotate_refresh_token ?? true;
const refreshWithoutOfflineAccess = config.refresh_token_without_offline_access ?? false;
const scopes = [...new Set([
  'openid', 'offline_access', 'profile', 'email', 'api', ...(config.scopes ?? []),
])];

const isLoopbackHttp = (uri) => {
  const u = URL.parse(uri);
  return u?.protocol === 'http:' && ['127.0.0.1', 'localhost', '[::1]'].includes(u.hostname);
};

// Defaults that make a minimal client entry useful for our daemon:
// - grant_types: without refresh_token no refresh token is ever issued.
// - application_type "native" when all redirect URIs are http loopback:
//   oidc-provider only applies RFC 8252 §7.3 port-agnostic loopback matching to
//   native clients (web clients get exact string matching), and the daemon's
//   redirect listener binds a random port. "native" changes nothing else the
//   daemon can observe (confidential native clients with secrets are allowed).
const clients = config.clients.map((c) => {
  const client = { grant_types: ['authorization_code', 'refresh_token'], ...c };
  if (client.application_type === undefined
      && (client.redirect_uris ?? []).length > 0
      && client.redirect_uris.every(isLoopbackHttp)) {
    client.application_type = 'native';
  }
  return client;
});

// ---------------------------------------------------------------- stats ----

// clientId -> grant_type -> { success, error }
const stats = new Map();

function recordTokenRequest(clientId, grantType, ok) {
  if (!stats.has(clientId)) stats.set(clientId, new Map());
  const perGrant = stats.get(clientId);
  if (!perGrant.has(grantType)) perGrant.set(grantType, { success: 0, error: 0 });
  perGrant.get(grantType)[ok ? 'success' : 'error'] += 1;
}

// Client id of a token request even when client authentication failed.
function tokenRequestClientId(ctx) {
  if (ctx.oidc?.client) return ctx.oidc.client.clientId;
  const fromBody = ctx.oidc?.params?.client_id ?? ctx.oidc?.body?.client_id;
  if (fromBody) return fromBody;
  const auth = ctx.get('authorization');
  if (auth.toLowerCase().startsWith('basic ')) {
    const decoded = Buffer.from(auth.slice(6).trim(), 'base64').toString();
    const user = decoded.slice(0, Math.max(decoded.indexOf(':'), 0));
    try { return decodeURIComponent(user.replace(/\+/g, ' ')); } catch { return user; }
  }
  return '(unknown)';
}

// ----------------------------------------------------------- admin API -----

function sendJson(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store' });
  res.end(`${JSON.stringify(body)}\n`);
}

// Handles /test/* (never part of a real authorization server). Returns false
// for any other path so the request goes on to oidc-provider.
function adminRoute(req, res, url) {
  if (!url.pathname.startsWith('/test/')) return false;
  const clientId = url.searchParams.get('client_id');
  if (!clientId) {
    sendJson(res, 400, { error: 'client_id query parameter is required' });
    return true;
  }

  if (url.pathname === '/test/revoke' && req.method === 'POST') {
    const result = revokeAllForClient(clientId);
    console.error(`test admin: revoked ${JSON.stringify(result)} for client ${clientId}`);
    sendJson(res, 200, result);
  } else if (url.pathname === '/test/stats' && req.method === 'GET') {
    const outcome = url.searchParams.get('outcome'); // null | "success" | "error"
    const body = {};
    for (const [grantType, counts] of stats.get(clientId) ?? []) {
      body[grantType] = outcome ? counts[outcome] ?? 0 : counts.success + counts.error;
    }
    sendJson(res, 200, body);
  } else if (url.pathname === '/test/stats' && req.method === 'DELETE') {
    stats.delete(clientId);
    sendJson(res, 200, {});
  } else {
    sendJson(res, 404, { error: 'unknown test endpoint' });
  }
  return true;
}

// ------------------------------------------------------------- server ------

// The issuer must contain the real port, which is only known after listen()
// (port 0 = any free port); so listen first and build the provider afterwards.
let providerCallback;
const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://127.0.0.1');
  if (adminRoute(req, res, url)) return;
  providerCallback(req, res);
});

server.on('error', (err) => fail(`listen failed: ${err.message}`));
await new Promise((resolve) => server.listen(config.port ?? 0, '127.0.0.1', resolve));
const { port } = server.address();
const issuer = `http://127.0.0.1:${port}`;

// A fresh signing key per run: the alternative is oidc-provider's built-in
// development keystore, whose private key is public.
const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: 'test-rs256', use: 'sig', alg: 'RS256' };

const provider = new Provider(issuer, {
  adapter: TestAdapter,
  clients,
  jwks: { keys: [signingKey] },
  cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
  scopes,
  // Every ttl is set explicitly; oidc-provider prints a NOTICE for each
  // default ttl function it has to call.
  ttl: {
    AccessToken: accessTokenTtl,
    AuthorizationCode: 120,
    IdToken: 3600,
    Interaction: 3600,
    Session: 14 * DAY,
    ClientCredentials: accessTokenTtl,
    DeviceCode: config.device_code_ttl ?? 600,
    RefreshToken: refreshTokenTtl,
    // A grant must outlive its refresh tokens or they die with it.
    Grant: Math.max(refreshTokenTtl, 14 * DAY),
  },
  rotateRefreshToken,
  // Default: refresh_token grant allowed for the client AND offline_access
  // granted. Optionally drop the offline_access condition.
  async issueRefreshToken(ctx, client, source) {
    if (!client.grantTypeAllowed('refresh_token')) return false;
    return refreshWithoutOfflineAccess || source.scopes.has('offline_access');
  },
  // Any login is accepted by the dev interactions; the account id is what was typed.
  async findAccount(ctx, sub) {
    return {
      accountId: sub,
      async claims() {
        return { sub, email: `${sub}@example.test`, email_verified: true, name: sub };
      },
    };
  },
  claims: { openid: ['sub'], email: ['email', 'email_verified'], profile: ['name'] },
  features: {
    devInteractions: { enabled: true },
    revocation: { enabled: true },
    introspection: { enabled: true },
    clientCredentials: { enabled: true },
    deviceFlow: { enabled: true },
  },
});

// OpenID Connect says offline_access must be ignored unless prompt=consent,
// and oidc-provider enforces that by silently removing offline_access from the
// scope. Plain OAuth clients like our daemon do not send prompt, so supply
// prompt=consent when offline_access is requested and no prompt was given.
// Consent is shown on first authorization anyway, so the only visible effect
// is that the consent page is shown on every authorization request.
provider.use(async (ctx, next) => {
  if (ctx.method === 'GET' && ctx.path === '/auth') {
    const query = ctx.query;
    const requested = typeof query.scope === 'string' ? query.scope.split(' ') : [];
    if (requested.includes('offline_access') && query.prompt === undefined) {
      ctx.query = { ...query, prompt: 'consent' };
    }
  }
  await next();
});

// Count token endpoint requests per client and grant_type for /test/stats.
provider.use(async (ctx, next) => {
  try {
    await next();
  } finally {
    if (ctx.method === 'POST' && ctx.path === '/token') {
      const grantType = ctx.oidc?.params?.grant_type ?? ctx.oidc?.body?.grant_type ?? '(none)';
      recordTokenRequest(tokenRequestClientId(ctx), grantType, ctx.status === 200);
    }
  }
});

// Errors are otherwise invisible (they go to the client only); log them so
// failing integration tests can be diagnosed from the server's stderr.
for (const event of ['server_error', 'grant.error', 'authorization.error', 'interaction.error',
  'introspection.error', 'revocation.error', 'userinfo.error', 'jwks.error', 'discovery.error']) {
  provider.on(event, (ctx, err) => {
    const error = err ?? ctx;
    console.error(`oidc-provider ${event}: ${error.name ?? ''} ${error.message ?? error}`
      + `${error.error_description ? ` (${error.error_description})` : ''}`);
  });
}
provider.on('grant.revoked', (ctx, grantId) => console.error(`oidc-provider grant.revoked: ${grantId}`));

providerCallback = provider.callback();

// Optional: die with the parent. A test harness that holds our stdin pipe
// makes sure a crashed test run does not leave servers behind.
if (config.exit_on_stdin_eof) {
  process.stdin.on('end', () => process.exit(0));
  process.stdin.on('close', () => process.exit(0));
  process.stdin.resume();
}

process.stdout.write(`${JSON.stringify({ issuer, port })}\n`);
