// In-memory storage adapter for oidc-provider, for tests only.
//
// oidc-provider ships a MemoryAdapter, but it is an LRU capped at 1000 entries
// and offers no way to enumerate what it holds. The test admin endpoint
// /test/revoke has to find every grant of a given client, so we keep a plain
// Map that can be scanned. Linear scans are fine at test-server scale.

// One store for all models; keys are `${model}:${id}`.
const store = new Map(); // key -> { model, id, payload, expiresAt (ms epoch | Infinity) }

const epochSeconds = () => Math.floor(Date.now() / 1000);
const isLive = (entry) => entry !== undefined && entry.expiresAt > Date.now();

// Models that hang off a Grant and must disappear with it.
const GRANT_BOUND = new Set([
  'AccessToken',
  'AuthorizationCode',
  'RefreshToken',
  'DeviceCode',
  'BackchannelAuthenticationRequest',
  'PreAuthorizedCode',
  'ClientCredentials',
]);

export class TestAdapter {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  // Copies in and out so that callers mutating a model instance never change
  // what is "stored" behind the provider's back (as a real database would behave).
  async upsert(id, payload, expiresIn) {
    store.set(this.key(id), {
      model: this.model,
      id,
      payload: structuredClone(payload),
      expiresAt: typeof expiresIn === 'number' ? Date.now() + expiresIn * 1000 : Infinity,
    });
  }

  async find(id) {
    const entry = store.get(this.key(id));
    return isLive(entry) ? structuredClone(entry.payload) : undefined;
  }

  #findBy(predicate) {
    for (const entry of store.values()) {
      if (entry.model === this.model && isLive(entry) && predicate(entry.payload)) {
        return structuredClone(entry.payload);
      }
    }
    return undefined;
  }

  async findByUid(uid) {
    return this.#findBy((p) => p.uid === uid);
  }

  async findByUserCode(userCode) {
    return this.#findBy((p) => p.userCode === userCode);
  }

  // A consumed refresh token that is presented again is what triggers
  // oidc-provider's replay detection (it then revokes the whole grant).
  async consume(id) {
    const entry = store.get(this.key(id));
    if (entry) entry.payload.consumed = epochSeconds();
  }

  async destroy(id) {
    store.delete(this.key(id));
  }

  async revokeByGrantId(grantId) {
    for (const [key, entry] of store) {
      if (entry.model === this.model && entry.payload.grantId === grantId) store.delete(key);
    }
  }
}

// Removes every Grant of clientId together with all tokens/codes issued under
// those grants (and any stray token of that client). Sessions are left alone:
// they only reference grants by id, and a missing grant simply makes the next
// authorization request ask for consent again.
export function revokeAllForClient(clientId) {
  const grantIds = new Set();
  for (const entry of store.values()) {
    if (entry.payload.clientId !== clientId) continue;
    if (entry.model === 'Grant') grantIds.add(entry.id);
    if (entry.payload.grantId) grantIds.add(entry.payload.grantId);
  }

  const removed = {};
  for (const [key, entry] of store) {
    const doomed = (entry.model === 'Grant' && grantIds.has(entry.id))
      || (GRANT_BOUND.has(entry.model)
        && (grantIds.has(entry.payload.grantId) || entry.payload.clientId === clientId));
    if (doomed) {
      store.delete(key);
      removed[entry.model] = (removed[entry.model] ?? 0) + 1;
    }
  }
  return { grants: grantIds.size, removed };
}

// Expired entries are never returned, but drop them periodically so a
// long-running test server does not grow without bound.
setInterval(() => {
  for (const [key, entry] of store) if (!isLive(entry)) store.delete(key);
}, 60_000).unref();
