//! The store: every client's state, tokens, pending authorizations and event history, in SQLite.
//!
//! One thread owns the writing connection. Callers send units of writes and wait for them to be
//! committed; the thread takes every unit waiting at that moment and commits them together in one
//! transaction (group commit), so a wave of refreshes costs one fsync, not one each. Each unit runs
//! in its own savepoint: a unit that fails is rolled back alone and reported to its caller alone.
//! A unit whose `commit` returned Ok is durable (WAL, synchronous=FULL): callers may then write
//! sinks and announce it. Reads at start-up and for `status` use their own connections.
//!
//! Secret columns (tokens, PKCE verifiers, device codes) pass through a `Sealer`: encrypted at
//! rest when `encryption.key` is set (see `seal.rs`). Opening the store brings every stored
//! secret to the form the keys ask for (sealed under the current key, or in the clear) in one
//! transaction, so a key rotation completes at the first start with the new key.

use crate::seal::Sealer;
use crate::secret::Secret;
use crate::token::TokenSet;
use rusqlite::{Connection, OptionalExtension, params};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use tokio::sync::{mpsc, oneshot};

/// Forward migrations; `PRAGMA user_version` is the number applied. Never edit one that shipped.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "CREATE TABLE clients (
        name TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        reason TEXT,
        last_refresh_at INTEGER,
        last_error TEXT,
        failures INTEGER NOT NULL DEFAULT 0,
        removed_at INTEGER,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE tokens (
        client TEXT PRIMARY KEY REFERENCES clients(name) ON DELETE CASCADE,
        access_token TEXT NOT NULL,
        token_type TEXT NOT NULL,
        refresh_token TEXT,
        id_token TEXT,
        scope TEXT,
        expires_at INTEGER,
        refresh_expires_at INTEGER,
        obtained_at INTEGER NOT NULL,
        generation INTEGER NOT NULL
    );
    CREATE TABLE pending_authorizations (
        state TEXT PRIMARY KEY,
        client TEXT NOT NULL,
        pkce_verifier TEXT,
        redirect_uri TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        at INTEGER NOT NULL,
        client TEXT,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX events_client_at ON events(client, at);
    CREATE INDEX events_at ON events(at);",
    // 2: provider profiles keep extra response fields; a grant's age bounds its refresh token;
    // a warning about a grant's end is given once.
    "ALTER TABLE tokens ADD COLUMN granted_at INTEGER;
    ALTER TABLE tokens ADD COLUMN extra TEXT;
    ALTER TABLE tokens ADD COLUMN refresh_expiry_slides INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE clients ADD COLUMN warned_for INTEGER;",
    // 3: a device authorization (RFC 8628) in progress goes on polling after a restart.
    "ALTER TABLE pending_authorizations ADD COLUMN device TEXT;",
    // 4: a refresh intent, written before a request that may rotate the refresh token and
    // cleared with its outcome: a start that finds one knows a refresh was cut short.
    "ALTER TABLE clients ADD COLUMN refresh_started_at INTEGER;",
];

/// Units waiting beyond this are left for the next transaction, so one commit stays short.
const MAX_UNITS_PER_COMMIT: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("database write failed: {0}")]
    Write(String),
    #[error("database read failed: {0}")]
    Read(String),
    #[error("the database writer has stopped")]
    Closed,
}

/// A client's row: its state as last committed.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientRow {
    pub name: String,
    pub status: String,
    pub fingerprint: String,
    pub reason: Option<String>,
    pub last_refresh_at: Option<i64>,
    pub last_error: Option<String>,
    pub failures: u32,
    pub removed_at: Option<i64>,
    pub updated_at: i64,
    /// The end of grant the user was last warned about.
    pub warned_for: Option<i64>,
    /// A refresh that may rotate the refresh token went out then, and its outcome is not
    /// saved yet.
    pub refresh_started_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PendingRow {
    pub state: String,
    pub client: String,
    pub pkce_verifier: Option<Secret>,
    /// The redirect URI; empty for a device authorization.
    pub redirect_uri: String,
    pub created_at: i64,
    pub expires_at: i64,
    /// A device authorization's codes and polling interval.
    pub device: Option<crate::device::DeviceGrant>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Event {
    pub at: i64,
    pub client: Option<String>,
    pub kind: String,
    pub detail: String,
}

/// One write; a `Vec<Write>` is a unit, committed all or nothing.
#[derive(Debug, Clone)]
pub enum Write {
    Client(ClientRow),
    /// Store the token (generation given) or, with `None`, forget it.
    Token {
        client: String,
        token: Option<(TokenSet, i64)>,
    },
    Pending(PendingRow),
    PendingDone {
        state: String,
    },
    Event(Event),
    /// Delete events before this time.
    PruneEvents {
        before: i64,
    },
    /// Forget clients (and their tokens) removed from the config before this time.
    ForgetRemoved {
        before: i64,
    },
}

/// Everything known about a client at start-up.
#[derive(Debug, Clone)]
pub struct Stored {
    pub row: ClientRow,
    pub token: Option<(TokenSet, i64)>,
}

/// What the store holds when the daemon starts.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub clients: Vec<Stored>,
    /// Authorizations that were waiting for the user.
    pub pending: Vec<PendingRow>,
}

struct Unit {
    writes: Vec<Write>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// A handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    path: PathBuf,
    tx: mpsc::UnboundedSender<Unit>,
    sealer: Sealer,
}

impl Store {
    /// Opens (creating, mode 0600) and migrates the database, brings its secrets to the form
    /// `sealer` writes, and starts the writer thread.
    pub fn open(
        path: &Path,
        sealer: Sealer,
    ) -> Result<(Store, std::thread::JoinHandle<()>), StoreError> {
        let mut conn = open_connection(path, true)?;
        if sealer.is_on() {
            // Deleted and overwritten values are zeroed, not left in free space.
            conn.execute_batch("PRAGMA secure_delete = ON;")
                .map_err(|e| StoreError::Write(e.to_string()))?;
        }
        let resealed = reseal(&mut conn, &sealer)?;
        if resealed > 0 {
            tracing::info!(
                values = resealed,
                encrypted = sealer.is_on(),
                "stored secrets rewritten for the configured encryption keys"
            );
        }
        let writer_sealer = sealer.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(conn, rx, writer_sealer))
            .map_err(|e| StoreError::Open {
                path: path.to_path_buf(),
                message: format!("cannot start the writer: {e}"),
            })?;
        Ok((
            Store {
                path: path.to_path_buf(),
                tx,
                sealer,
            },
            writer,
        ))
    }

    /// Commits `writes` as one unit; returns once it is durable.
    pub async fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Unit { writes, done })
            .map_err(|_| StoreError::Closed)?;
        wait.await.map_err(|_| StoreError::Closed)?
    }

    /// Closes the store: the writer finishes what it was sent and stops once every handle is gone.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every client and token, for start-up.
    pub fn load(&self) -> Result<Vec<Stored>, StoreError> {
        let conn = open_connection(&self.path, false)?;
        load_all(&conn, &self.sealer).map_err(|e| StoreError::Read(e.to_string()))
    }

    /// Every client, token and pending authorization, for start-up.
    pub fn snapshot(&self) -> Result<Snapshot, StoreError> {
        Ok(Snapshot {
            clients: self.load()?,
            pending: self.pending()?,
        })
    }

    pub fn pending(&self) -> Result<Vec<PendingRow>, StoreError> {
        let conn = open_connection(&self.path, false)?;
        let mut stmt = conn
            .prepare("SELECT state, client, pkce_verifier, redirect_uri, created_at, expires_at, device FROM pending_authorizations")
            .map_err(read_err)?;
        let rows = stmt
            .query_map([], |r| {
                let state: String = r.get(0)?;
                let open = |column: usize, name: &str| {
                    r.get::<_, Option<String>>(column)?
                        .map(|v| opened(&self.sealer, &v, &pending_place(name, &state)))
                        .transpose()
                };
                Ok(PendingRow {
                    client: r.get(1)?,
                    pkce_verifier: open(2, "pkce_verifier")?.map(Secret::new),
                    redirect_uri: r.get(3)?,
                    created_at: r.get(4)?,
                    expires_at: r.get(5)?,
                    // A row this version cannot read is dropped like an expired one.
                    device: open(6, "device")?.and_then(|json| serde_json::from_str(&json).ok()),
                    state,
                })
            })
            .map_err(read_err)?;
        rows.collect::<Result<_, _>>().map_err(read_err)
    }

    /// The newest `limit` events of a client, newest first (blocking: call off the runtime).
    pub fn events(&self, client: &str, limit: usize) -> Result<Vec<Event>, StoreError> {
        let conn = open_connection(&self.path, false)?;
        let mut stmt = conn
            .prepare("SELECT at, client, kind, detail FROM events WHERE client = ?1 ORDER BY at DESC, id DESC LIMIT ?2")
            .map_err(read_err)?;
        let rows = stmt
            .query_map(params![client, limit as i64], |r| {
                Ok(Event {
                    at: r.get(0)?,
                    client: r.get(1)?,
                    kind: r.get(2)?,
                    detail: r.get(3)?,
                })
            })
            .map_err(read_err)?;
        rows.collect::<Result<_, _>>().map_err(read_err)
    }
}

fn read_err(e: rusqlite::Error) -> StoreError {
    StoreError::Read(e.to_string())
}

/// Where a token secret is stored: the associated data that binds it to its row and column.
fn token_place(column: &str, client: &str) -> String {
    format!("tokens.{column}/{client}")
}

fn pending_place(column: &str, state: &str) -> String {
    format!("pending_authorizations.{column}/{state}")
}

/// `stored` opened, as a row-mapping error when it cannot be (the message names the key).
fn opened(sealer: &Sealer, stored: &str, place: &str) -> rusqlite::Result<String> {
    sealer
        .open(stored, place)
        // Column usize::MAX: rusqlite then shows the seal error alone, which names the place.
        .map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(
                usize::MAX,
                rusqlite::types::Type::Text,
                Box::new(e),
            )
        })
}

/// A column that holds a secret, sealed when encryption is on.
struct SealedColumn {
    table: &'static str,
    /// The column naming the row, bound into the seal.
    key: &'static str,
    column: &'static str,
    place: fn(&str, &str) -> String,
}

const SEALED_COLUMNS: [SealedColumn; 6] = {
    const fn tokens(column: &'static str) -> SealedColumn {
        SealedColumn {
            table: "tokens",
            key: "client",
            column,
            place: token_place,
        }
    }
    const fn pending(column: &'static str) -> SealedColumn {
        SealedColumn {
            table: "pending_authorizations",
            key: "state",
            column,
            place: pending_place,
        }
    }
    [
        tokens("access_token"),
        tokens("refresh_token"),
        tokens("id_token"),
        // Kept response fields may be credentials too (Slack's incoming webhook URL).
        tokens("extra"),
        pending("pkce_verifier"),
        pending("device"),
    ]
};

/// Rewrites every stored secret that is not in the form `sealer` writes (in the clear while a
/// key is set, under an old key, or sealed while encryption is off), in one transaction: a value
/// that cannot be opened stops the start with nothing changed. Returns how many were rewritten.
fn reseal(conn: &mut Connection, sealer: &Sealer) -> Result<usize, StoreError> {
    let tx = conn
        .transaction()
        .map_err(|e| StoreError::Write(e.to_string()))?;
    let mut rewritten = 0;
    for SealedColumn {
        table,
        key,
        column,
        place,
    } in SEALED_COLUMNS
    {
        let stale: Vec<(String, String)> = {
            let mut stmt = tx
                .prepare(&format!(
                    "SELECT {key}, {column} FROM {table} WHERE {column} IS NOT NULL"
                ))
                .map_err(read_err)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(read_err)?;
            // Errors pass through to `collect`, which reports them.
            rows.filter(|r| r.as_ref().map_or(true, |(_, v)| sealer.is_stale(v)))
                .collect::<Result<_, _>>()
                .map_err(read_err)?
        };
        let mut update = tx
            .prepare(&format!(
                "UPDATE {table} SET {column} = ?1 WHERE {key} = ?2"
            ))
            .map_err(read_err)?;
        for (row, stored) in stale {
            let at = place(column, &row);
            let value = sealer
                .open(&stored, &at)
                .map_err(|e| StoreError::Read(e.to_string()))?;
            update
                .execute(params![sealer.seal(&value, &at), row])
                .map_err(|e| StoreError::Write(e.to_string()))?;
            rewritten += 1;
        }
    }
    tx.commit().map_err(|e| StoreError::Write(e.to_string()))?;
    if rewritten > 0 {
        // The old forms linger in free pages (values deleted before, the rows just rewritten)
        // and in the write-ahead log: rebuild the file and empty the log.
        conn.execute_batch("VACUUM;")
            .map_err(|e| StoreError::Write(format!("VACUUM after re-encryption: {e}")))?;
        let busy: i64 = conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
            .map_err(|e| StoreError::Write(e.to_string()))?;
        if busy != 0 {
            tracing::warn!(
                "the write-ahead log could not be emptied after re-encryption; earlier forms of the secrets stay in it until the next checkpoint"
            );
        }
    }
    Ok(rewritten)
}

fn open_connection(path: &Path, create: bool) -> Result<Connection, StoreError> {
    let fail = |message: String| StoreError::Open {
        path: path.to_path_buf(),
        message,
    };
    if create {
        if let Some(dir) = path.parent() {
            crate::sink::make_dir(dir, None).map_err(fail)?;
        }
        // Create the file ourselves so it is 0600 from its first byte; SQLite gives the -wal and
        // -shm files the same mode.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| fail(e.to_string()))?;
    }
    let conn = Connection::open(path).map_err(|e| fail(e.to_string()))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(|e| fail(e.to_string()))?;
    conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")
        .map_err(|e| fail(e.to_string()))?;
    if create {
        migrate(&conn).map_err(fail)?;
    }
    Ok(conn)
}

fn migrate(conn: &Connection) -> Result<(), String> {
    let version: usize = conn
        .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .map_err(|e| e.to_string())? as usize;
    if version > MIGRATIONS.len() {
        return Err(format!(
            "schema version {version} was written by a newer oauth2mci (this one knows {}); refusing to touch it",
            MIGRATIONS.len()
        ));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let batch = format!(
            "BEGIN IMMEDIATE; {sql}; PRAGMA user_version = {}; COMMIT;",
            i + 1
        );
        conn.execute_batch(&batch).map_err(|e| {
            let _ = conn.execute_batch("ROLLBACK");
            format!("migration to schema {} failed: {e}", i + 1)
        })?;
    }
    Ok(())
}

fn writer_loop(mut conn: Connection, mut rx: mpsc::UnboundedReceiver<Unit>, sealer: Sealer) {
    let mut batch = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_UNITS_PER_COMMIT {
            match rx.try_recv() {
                Ok(unit) => batch.push(unit),
                Err(_) => break,
            }
        }
        commit_batch(&mut conn, &mut batch, &sealer);
    }
}

fn commit_batch(conn: &mut Connection, batch: &mut Vec<Unit>, sealer: &Sealer) {
    let mut results: Vec<Result<(), StoreError>> = Vec::with_capacity(batch.len());
    let outcome = (|| -> rusqlite::Result<()> {
        let mut tx = conn.transaction()?;
        for unit in batch.iter() {
            let sp = tx.savepoint()?;
            match apply_unit(&sp, &unit.writes, sealer) {
                Ok(()) => {
                    sp.commit()?;
                    results.push(Ok(()));
                }
                Err(e) => {
                    drop(sp); // rolls the unit back
                    results.push(Err(StoreError::Write(e.to_string())));
                }
            }
        }
        tx.set_drop_behavior(rusqlite::DropBehavior::Commit);
        tx.commit()
    })();
    for (i, unit) in batch.drain(..).enumerate() {
        let result = match &outcome {
            Ok(()) => results
                .get_mut(i)
                .map_or(Err(StoreError::Closed), |r| std::mem::replace(r, Ok(()))),
            Err(e) => Err(StoreError::Write(e.to_string())),
        };
        let _ = unit.done.send(result);
    }
}

fn apply_unit(conn: &Connection, writes: &[Write], sealer: &Sealer) -> rusqlite::Result<()> {
    for w in writes {
        match w {
            Write::Client(c) => {
                conn.prepare_cached(
                    "INSERT INTO clients (name, status, fingerprint, reason, last_refresh_at, last_error, failures, removed_at, updated_at, warned_for, refresh_started_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                     ON CONFLICT(name) DO UPDATE SET status=excluded.status, fingerprint=excluded.fingerprint,
                       reason=excluded.reason, last_refresh_at=excluded.last_refresh_at, last_error=excluded.last_error,
                       failures=excluded.failures, removed_at=excluded.removed_at, updated_at=excluded.updated_at,
                       warned_for=excluded.warned_for, refresh_started_at=excluded.refresh_started_at",
                )?
                .execute(params![
                    c.name,
                    c.status,
                    c.fingerprint,
                    c.reason,
                    c.last_refresh_at,
                    c.last_error,
                    c.failures,
                    c.removed_at,
                    c.updated_at,
                    c.warned_for,
                    c.refresh_started_at
                ])?;
            }
            Write::Token {
                client,
                token: Some((t, generation)),
            } => {
                let seal = |column: &str, v: &str| sealer.seal(v, &token_place(column, client));
                conn.prepare_cached(
                    "INSERT INTO tokens (client, access_token, token_type, refresh_token, id_token, scope, expires_at, refresh_expires_at, obtained_at, generation, granted_at, extra, refresh_expiry_slides)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
                     ON CONFLICT(client) DO UPDATE SET access_token=excluded.access_token, token_type=excluded.token_type,
                       refresh_token=excluded.refresh_token, id_token=excluded.id_token, scope=excluded.scope,
                       expires_at=excluded.expires_at, refresh_expires_at=excluded.refresh_expires_at,
                       obtained_at=excluded.obtained_at, generation=excluded.generation,
                       granted_at=excluded.granted_at, extra=excluded.extra,
                       refresh_expiry_slides=excluded.refresh_expiry_slides",
                )?
                .execute(params![
                    client,
                    seal("access_token", t.access_token.expose()),
                    t.token_type,
                    t.refresh_token.as_ref().map(|v| seal("refresh_token", v.expose())),
                    t.id_token.as_ref().map(|v| seal("id_token", v.expose())),
                    t.scope,
                    t.expires_at,
                    t.refresh_expires_at,
                    t.obtained_at,
                    generation,
                    t.granted_at,
                    // Serialising a map of JSON values cannot fail.
                    (!t.extra.is_empty())
                        .then(|| serde_json::to_string(&t.extra).ok())
                        .flatten()
                        .map(|json| seal("extra", &json)),
                    t.refresh_expiry_slides
                ])?;
            }
            Write::Token {
                client,
                token: None,
            } => {
                conn.prepare_cached("DELETE FROM tokens WHERE client = ?1")?
                    .execute([client])?;
            }
            Write::Pending(p) => {
                conn.prepare_cached(
                    "INSERT OR REPLACE INTO pending_authorizations (state, client, pkce_verifier, redirect_uri, created_at, expires_at, device)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?
                .execute(params![
                    p.state,
                    p.client,
                    p.pkce_verifier
                        .as_ref()
                        .map(|v| sealer.seal(v.expose(), &pending_place("pkce_verifier", &p.state))),
                    p.redirect_uri,
                    p.created_at,
                    p.expires_at,
                    p.device
                        .as_ref()
                        .and_then(|d| serde_json::to_string(d).ok())
                        .map(|json| sealer.seal(&json, &pending_place("device", &p.state)))
                ])?;
            }
            Write::PendingDone { state } => {
                conn.prepare_cached("DELETE FROM pending_authorizations WHERE state = ?1")?
                    .execute([state])?;
            }
            Write::Event(e) => {
                conn.prepare_cached(
                    "INSERT INTO events (at, client, kind, detail) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![e.at, e.client, e.kind, e.detail])?;
            }
            Write::PruneEvents { before } => {
                conn.prepare_cached("DELETE FROM events WHERE at < ?1")?
                    .execute([before])?;
                conn.prepare_cached("DELETE FROM pending_authorizations WHERE expires_at < ?1")?
                    .execute([before])?;
            }
            Write::ForgetRemoved { before } => {
                conn.prepare_cached(
                    "DELETE FROM clients WHERE removed_at IS NOT NULL AND removed_at < ?1",
                )?
                .execute([before])?;
            }
        }
    }
    Ok(())
}

fn load_all(conn: &Connection, sealer: &Sealer) -> rusqlite::Result<Vec<Stored>> {
    let mut stmt = conn.prepare(
        "SELECT c.name, c.status, c.fingerprint, c.reason, c.last_refresh_at, c.last_error, c.failures, c.removed_at, c.updated_at,
                t.access_token, t.token_type, t.refresh_token, t.id_token, t.scope, t.expires_at, t.refresh_expires_at,
                t.obtained_at, t.generation, t.granted_at, t.extra, c.warned_for, t.refresh_expiry_slides,
                c.refresh_started_at
         FROM clients c LEFT JOIN tokens t ON t.client = c.name",
    )?;
    let rows = stmt.query_map([], |r| {
        let row = ClientRow {
            name: r.get(0)?,
            status: r.get(1)?,
            fingerprint: r.get(2)?,
            reason: r.get(3)?,
            last_refresh_at: r.get(4)?,
            last_error: r.get(5)?,
            failures: r.get(6)?,
            removed_at: r.get(7)?,
            updated_at: r.get(8)?,
            warned_for: r.get(20)?,
            refresh_started_at: r.get(22)?,
        };
        let open = |column: usize, name: &str| {
            r.get::<_, Option<String>>(column)?
                .map(|v| opened(sealer, &v, &token_place(name, &row.name)).map(Secret::new))
                .transpose()
        };
        let token = match open(9, "access_token")? {
            None => None,
            Some(access_token) => Some((
                TokenSet {
                    access_token,
                    token_type: crate::token::token_type(r.get(10)?),
                    refresh_token: open(11, "refresh_token")?,
                    id_token: open(12, "id_token")?,
                    scope: r.get(13)?,
                    expires_at: r.get(14)?,
                    refresh_expires_at: r.get(15)?,
                    obtained_at: r.get(16)?,
                    granted_at: r.get::<_, Option<i64>>(18)?.unwrap_or(r.get(16)?),
                    extra: match r
                        .get::<_, Option<String>>(19)?
                        .map(|v| opened(sealer, &v, &token_place("extra", &row.name)))
                        .transpose()?
                    {
                        Some(json) => match serde_json::from_str(&json) {
                            Ok(serde_json::Value::Object(map)) => map,
                            _ => serde_json::Map::new(),
                        },
                        None => serde_json::Map::new(),
                    },
                    refresh_expiry_slides: r.get::<_, Option<bool>>(21)?.unwrap_or(false),
                },
                r.get(17)?,
            )),
        };
        Ok(Stored { row, token })
    })?;
    rows.collect()
}

/// Whether the database holds any row for `name` (tests and diagnostics).
pub fn has_client(path: &Path, name: &str) -> Result<bool, StoreError> {
    let conn = open_connection(path, false)?;
    conn.query_row("SELECT 1 FROM clients WHERE name = ?1", [name], |_| Ok(()))
        .optional()
        .map(|r| r.is_some())
        .map_err(read_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn row(name: &str) -> ClientRow {
        ClientRow {
            name: name.into(),
            status: "valid".into(),
            fingerprint: "f".into(),
            reason: None,
            last_refresh_at: None,
            last_error: None,
            failures: 0,
            removed_at: None,
            updated_at: 1,
            warned_for: None,
            refresh_started_at: None,
        }
    }

    fn token(at: &str) -> TokenSet {
        TokenSet {
            access_token: Secret::new(at),
            token_type: "Bearer".into(),
            refresh_token: Some(Secret::new("rt")),
            id_token: None,
            scope: Some("a b".into()),
            expires_at: Some(5),
            refresh_expires_at: None,
            obtained_at: 1,
            granted_at: 1,
            extra: serde_json::Map::from_iter([("instance_url".to_string(), "https://x".into())]),
            refresh_expiry_slides: false,
        }
    }

    #[tokio::test]
    async fn commits_survive_reopening_and_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.db");
        let (store, writer) = Store::open(&path, Sealer::clear()).unwrap();
        store
            .commit(vec![
                Write::Client(row("a")),
                Write::Token {
                    client: "a".into(),
                    token: Some((token("at1"), 1)),
                },
            ])
            .await
            .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(store);
        writer.join().unwrap();

        let (store, _writer) = Store::open(&path, Sealer::clear()).unwrap();
        let all = store.load().unwrap();
        assert_eq!(all.len(), 1);
        let (t, generation) = all[0].token.clone().unwrap();
        assert_eq!((t, generation), (token("at1"), 1));
    }

    #[tokio::test]
    async fn a_failing_unit_does_not_spoil_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _w) = Store::open(&dir.path().join("s.db"), Sealer::clear()).unwrap();
        // A token for a client that has no row breaks the foreign key: only that unit fails.
        let bad = store.commit(vec![
            Write::Client(row("x")),
            Write::Token {
                client: "nobody".into(),
                token: Some((token("t"), 1)),
            },
        ]);
        let good = store.commit(vec![Write::Client(row("b"))]);
        let (bad, good) = tokio::join!(bad, good);
        assert!(bad.is_err());
        good.unwrap();
        let names: Vec<String> = store
            .load()
            .unwrap()
            .into_iter()
            .map(|s| s.row.name)
            .collect();
        assert_eq!(
            names,
            vec!["b".to_string()],
            "the failed unit's client row was rolled back too"
        );
    }

    #[tokio::test]
    async fn concurrent_units_are_group_committed() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _w) = Store::open(&dir.path().join("s.db"), Sealer::clear()).unwrap();
        let units = (0..500).map(|i| {
            let s = store.clone();
            async move { s.commit(vec![Write::Client(row(&format!("c{i}")))]).await }
        });
        for r in futures::future::join_all(units).await {
            r.unwrap();
        }
        assert_eq!(store.load().unwrap().len(), 500);
    }

    fn sealer(current: Option<u8>, old: &[u8]) -> Sealer {
        let key = |n: u8| crate::seal::Key::from_bytes([n; 32]);
        Sealer::new(&crate::seal::Keys {
            current: current.map(key),
            old: old.iter().map(|&n| key(n)).collect(),
        })
    }

    /// Every byte of the database and its write-ahead log.
    fn file_bytes(path: &Path) -> Vec<u8> {
        let mut all = std::fs::read(path).unwrap();
        all.extend(std::fs::read(path.with_extension("db-wal")).unwrap_or_default());
        all
    }

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    }

    #[tokio::test]
    async fn secrets_are_sealed_at_rest_and_keys_rotate_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let pending = PendingRow {
            state: "st".into(),
            client: "a".into(),
            pkce_verifier: Some(Secret::new("verifier-7f3a9c")),
            redirect_uri: "http://127.0.0.1:1/cb".into(),
            created_at: 1,
            expires_at: i64::MAX,
            device: None,
        };
        // Written in the clear first, as by a daemon before encryption was configured.
        let (store, w) = Store::open(&path, Sealer::clear()).unwrap();
        let writes = vec![
            Write::Client(row("a")),
            Write::Token {
                client: "a".into(),
                token: Some((token("access-5d1e8b"), 1)),
            },
            Write::Pending(pending),
        ];
        store.commit(writes).await.unwrap();
        // A token deleted before encryption was configured: its clear text sits in free pages.
        let deleted = format!("deleted-{}", "q".repeat(9000));
        let gone = vec![
            Write::Client(row("b")),
            Write::Token {
                client: "b".into(),
                token: Some((token(&deleted), 1)),
            },
        ];
        store.commit(gone).await.unwrap();
        let forget = Write::Token {
            client: "b".into(),
            token: None,
        };
        store.commit(vec![forget]).await.unwrap();
        drop(store);
        w.join().unwrap();
        assert!(contains(&file_bytes(&path), "access-5d1e8b"));
        assert!(contains(&file_bytes(&path), &deleted[..100]));

        // Key 1 configured: everything is sealed at open, and the clear text is gone from the
        // file, free pages and log included.
        let (store, w) = Store::open(&path, sealer(Some(1), &[])).unwrap();
        let loaded = store.load().unwrap();
        let (t, _) = loaded[0].token.as_ref().unwrap();
        assert_eq!(t.access_token.expose(), "access-5d1e8b");
        assert_eq!(t.refresh_token.as_ref().unwrap().expose(), "rt");
        assert_eq!(t.extra["instance_url"], "https://x");
        let pending = store.pending().unwrap();
        assert_eq!(
            pending[0].pkce_verifier.as_ref().unwrap().expose(),
            "verifier-7f3a9c"
        );
        drop(store);
        w.join().unwrap();
        let bytes = file_bytes(&path);
        for secret in [
            "access-5d1e8b",
            "verifier-7f3a9c",
            "https://x",
            &deleted[..100],
        ] {
            assert!(!contains(&bytes, secret), "{secret} is still in the file");
        }

        // Without the key, the start is refused, naming it, and nothing is changed.
        let key1 = crate::seal::Key::from_bytes([1; 32]);
        for keys in [sealer(None, &[]), sealer(Some(2), &[])] {
            let e = Store::open(&path, keys).err().unwrap().to_string();
            assert!(e.contains(&format!("key {}", key1.id())), "{e}");
        }
        // Rotated: key 2 current, key 1 old. Values move to key 2; then key 1 can go.
        let (store, w) = Store::open(&path, sealer(Some(2), &[1])).unwrap();
        drop(store);
        w.join().unwrap();
        let (store, w) = Store::open(&path, sealer(Some(2), &[])).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(
            loaded[0].token.as_ref().unwrap().0.access_token.expose(),
            "access-5d1e8b"
        );
        drop(store);
        w.join().unwrap();
        // Turned off: the old key opens everything, which is stored in the clear again.
        let (store, w) = Store::open(&path, sealer(None, &[2])).unwrap();
        drop(store);
        w.join().unwrap();
        let (store, _w) = Store::open(&path, Sealer::clear()).unwrap();
        assert_eq!(
            store.pending().unwrap()[0]
                .pkce_verifier
                .as_ref()
                .unwrap()
                .expose(),
            "verifier-7f3a9c"
        );
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("PRAGMA user_version = 99").unwrap();
        drop(conn);
        let e = Store::open(&path, Sealer::clear()).err().unwrap();
        assert!(e.to_string().contains("newer oauth2mci"), "{e}");
    }
}
