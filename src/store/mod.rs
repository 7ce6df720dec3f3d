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
    /// A device authorization's codes and polling interval, as its owner wrote them (JSON):
    /// the store keeps it sealed without reading it.
    pub device: Option<Secret>,
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

/// What the writer thread is sent.
enum Msg {
    Unit(Unit),
    /// Look whether the database's files are still the ones open (a file event said they may
    /// not be).
    CheckFiles,
}

/// How the store is doing, for `status`, health and metrics.
#[derive(Debug, Clone, Default)]
pub struct Health {
    /// Why the last commit failed, until one succeeds.
    pub failing: Option<String>,
    /// Times the database's files were found deleted or replaced under the daemon and were
    /// written again from what it held.
    pub rescues: u64,
}

/// A handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    path: PathBuf,
    tx: mpsc::UnboundedSender<Msg>,
    sealer: Sealer,
    health: std::sync::Arc<std::sync::Mutex<Health>>,
}

impl Store {
    /// Opens (creating, mode 0600) and migrates the database, brings its secrets to the form
    /// `sealer` writes, and starts the writer thread.
    pub fn open(
        path: &Path,
        sealer: Sealer,
    ) -> Result<(Store, std::thread::JoinHandle<()>), StoreError> {
        let mut conn = open_connection(path, true)?;
        check_integrity(&conn, path)?;
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
        let health = std::sync::Arc::new(std::sync::Mutex::new(Health::default()));
        let writer = Writer {
            files: FileIds::of(path),
            conn,
            path: path.to_path_buf(),
            sealer: sealer.clone(),
            health: health.clone(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Open {
                path: path.to_path_buf(),
                message: format!("cannot start the writer: {e}"),
            })?;
        Ok((
            Store {
                path: path.to_path_buf(),
                tx,
                sealer,
                health,
            },
            thread,
        ))
    }

    /// Asks the writer to look whether the database's files are still those it has open, and
    /// to write them again from what it holds if not.
    pub fn check_files(&self) {
        let _ = self.tx.send(Msg::CheckFiles);
    }

    /// How the store is doing.
    pub fn health(&self) -> Health {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Commits `writes` as one unit; returns once it is durable.
    pub async fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Msg::Unit(Unit { writes, done }))
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
                    device: open(6, "device")?.map(Secret::new),
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
            crate::files::make_dir(dir, None).map_err(fail)?;
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
    if create {
        refuse_a_stranger(&conn, path).map_err(fail)?;
    }
    conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")
        .map_err(|e| fail(unreadable(&e, path).unwrap_or_else(|| e.to_string())))?;
    if create {
        migrate(&conn, path).map_err(fail)?;
    }
    Ok(conn)
}

/// Why a database cannot be used, and the way out.
fn damaged_message(path: &Path, what: &str) -> String {
    format!(
        "the database is damaged ({what}); restore it from a backup, or move it aside to start with an empty one (every client will need authorizing again): mv {0} {0}.damaged",
        path.display()
    )
}

/// SQLite's message for a log line: its own messages may quote SQL across lines.
fn one_line(e: &rusqlite::Error) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The message for a file SQLite cannot read as a database at all.
fn unreadable(e: &rusqlite::Error, path: &Path) -> Option<String> {
    use rusqlite::ErrorCode::{DatabaseCorrupt, NotADatabase};
    matches!(e.sqlite_error_code(), Some(NotADatabase | DatabaseCorrupt))
        .then(|| damaged_message(path, &e.to_string()))
}

/// Refuses a database oauth2mci never touched but something else filled, before anything is
/// written to it (even the switch to WAL): adding our tables would mix two programs' data, and a
/// later "move it aside" would take theirs too.
fn refuse_a_stranger(conn: &Connection, path: &Path) -> Result<(), String> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| unreadable(&e, path).unwrap_or_else(|| one_line(&e)))?;
    if version != 0 {
        return Ok(());
    }
    let mut found = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY name LIMIT 4",
        )
        .and_then(|mut q| {
            q.query_map([], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<String>>>()
        })
        .map_err(|e| unreadable(&e, path).unwrap_or_else(|| one_line(&e)))?;
    if !found.is_empty() {
        if found.len() == 4 {
            found[3] = "...".into();
        }
        return Err(format!(
            "it is a database oauth2mci did not make (it holds {}); point paths.state at a folder of the daemon's own",
            found.join(", ")
        ));
    }
    Ok(())
}

fn migrate(conn: &Connection, path: &Path) -> Result<(), String> {
    let version: usize =
        conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
            .map_err(|e| unreadable(&e, path).unwrap_or_else(|| e.to_string()))? as usize;
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
            format!("migration to schema {} failed: {}", i + 1, one_line(&e))
        })?;
    }
    Ok(())
}

/// The device and inode of the database's files, as the writer opened them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct FileIds {
    db: Option<(u64, u64)>,
    wal: Option<(u64, u64)>,
    shm: Option<(u64, u64)>,
}

fn companion(path: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}{suffix}", path.display()))
}

impl FileIds {
    fn of(path: &Path) -> FileIds {
        use std::os::unix::fs::MetadataExt;
        let id = |p: PathBuf| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
        FileIds {
            db: id(path.to_path_buf()),
            wal: id(companion(path, "-wal")),
            shm: id(companion(path, "-shm")),
        }
    }

    /// What became of the files open as `self`, now `now`, if anything did. A file not there
    /// when opened (the log before the first write) is taken as it comes.
    fn lost(&self, now: &FileIds) -> Option<&'static str> {
        let changed = |was: Option<(u64, u64)>, is: Option<(u64, u64)>| was.is_some() && was != is;
        if changed(self.db, now.db) {
            Some(if now.db.is_none() {
                "the database file was deleted"
            } else {
                "the database file was replaced"
            })
        } else if changed(self.wal, now.wal) {
            Some(if now.wal.is_none() {
                "its write-ahead log (-wal) was deleted"
            } else {
                "its write-ahead log (-wal) was replaced"
            })
        } else if changed(self.shm, now.shm) {
            Some("its shared-memory file (-shm) was deleted or replaced")
        } else {
            None
        }
    }
}

/// The thread that owns the writing connection.
struct Writer {
    conn: Connection,
    path: PathBuf,
    sealer: Sealer,
    files: FileIds,
    health: std::sync::Arc<std::sync::Mutex<Health>>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let mut batch = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                if let Msg::Unit(unit) = msg {
                    batch.push(unit);
                }
                if batch.len() < MAX_UNITS_PER_COMMIT {
                    next = rx.try_recv().ok();
                }
            }
            // Two or three stat calls a transaction: a database deleted or replaced under the
            // daemon is seen before anything more is written into the lost file.
            self.check_files();
            if batch.is_empty() {
                continue;
            }
            let failed = commit_batch(&mut self.conn, &mut batch, &self.sealer);
            self.health
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .failing = failed;
        }
    }

    fn check_files(&mut self) {
        let now = FileIds::of(&self.path);
        if self.files.wal.is_none() && now.wal.is_some()
            || self.files.shm.is_none() && now.shm.is_some()
        {
            // Made since the connection opened (the first write): ours.
            self.files = FileIds {
                db: self.files.db,
                ..now
            };
        }
        let Some(what) = self.files.lost(&now) else {
            return;
        };
        tracing::error!(
            "{what} under the running daemon ({}): what was committed lives on only in the daemon's open files and would be lost at the next stop; writing it to a new database there",
            self.path.display()
        );
        match self.rescue() {
            Ok(aside) => {
                self.health
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .rescues += 1;
                tracing::error!(
                    "the database {} was written again from what the daemon held; nothing committed was lost{}",
                    self.path.display(),
                    aside
                        .map(|p| format!(" (the file found there was moved to {})", p.display()))
                        .unwrap_or_default()
                );
            }
            Err(e) => {
                tracing::error!("cannot write the database again: {e}; retrying at the next write");
                self.health
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .failing = Some(format!("{what}, and it cannot be written again: {e}"));
            }
        }
    }

    /// Writes everything the open connection sees (the lost files included) to a new database
    /// file, puts it at the database's path (moving aside a file that is not ours), and opens
    /// it. Returns where a foreign file was moved.
    fn rescue(&mut self) -> Result<Option<PathBuf>, String> {
        use std::os::unix::fs::MetadataExt;
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        let copy = dir.join(format!(".state.db.rescue-{}", std::process::id()));
        let _ = std::fs::remove_file(&copy);
        self.conn
            .execute("VACUUM INTO ?1", [copy.to_string_lossy()])
            .map_err(|e| format!("cannot copy the open database: {e}"))?;
        std::fs::File::open(&copy)
            .and_then(|f| f.sync_all())
            .map_err(|e| format!("cannot sync {}: {e}", copy.display()))?;
        // Closed: SQLite folds its log into the file it has open and removes the log's name.
        let placeholder = Connection::open_in_memory().map_err(|e| e.to_string())?;
        drop(std::mem::replace(&mut self.conn, placeholder));
        let foreign = std::fs::metadata(&self.path)
            .ok()
            .is_some_and(|m| Some((m.dev(), m.ino())) != self.files.db);
        let mut aside = None;
        if foreign {
            let stamp = crate::token::now_ms() / 1000;
            let to = companion(&self.path, &format!(".replaced-{stamp}"));
            std::fs::rename(&self.path, &to)
                .map_err(|e| format!("cannot move the file found at the path aside: {e}"))?;
            for suffix in ["-wal", "-shm"] {
                let _ = std::fs::rename(companion(&self.path, suffix), companion(&to, suffix));
            }
            aside = Some(to);
        }
        // A log left at the path is not the new file's: it must not be applied to it.
        for suffix in ["-wal", "-shm", "-journal"] {
            let _ = std::fs::remove_file(companion(&self.path, suffix));
        }
        std::fs::rename(&copy, &self.path)
            .map_err(|e| format!("cannot put the copy in place: {e}"))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| e.to_string())?;
        let conn = open_connection(&self.path, false).map_err(|e| e.to_string())?;
        if self.sealer.is_on() {
            conn.execute_batch("PRAGMA secure_delete = ON;")
                .map_err(|e| e.to_string())?;
        }
        // The log and shared memory are made by the first transaction: start one now.
        conn.execute_batch("BEGIN IMMEDIATE; COMMIT;")
            .map_err(|e| e.to_string())?;
        self.conn = conn;
        self.files = FileIds::of(&self.path);
        Ok(aside)
    }
}

/// What `PRAGMA integrity_check` says, line by line, of a database that is not in order
/// (`quick_check` would skip whether the indexes hold what the tables do).
fn integrity_problems(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare("PRAGMA integrity_check(20)")?;
    let lines = stmt.query_map([], |r| r.get::<_, String>(0))?;
    let lines: Vec<String> = lines.collect::<Result<_, _>>()?;
    Ok(if lines == ["ok"] { Vec::new() } else { lines })
}

/// Whether every problem is one REINDEX repairs: entries missing from an index, or extra.
fn index_only(problems: &[String]) -> bool {
    problems.iter().all(|p| {
        (p.starts_with("row ") && p.contains(" missing from index "))
            || p.starts_with("wrong # of entries in index ")
            || p.starts_with("non-unique entry in index ")
    })
}

/// Refuses a damaged database with the way out, and repairs what only damages its indexes.
/// `PRAGMA integrity_check` reads every page and compares every index with its table: 0.2 s
/// for a 40 MB database of 100,000 clients, on the store's own thread at start (beside the
/// configuration's parsing from 5,000 clients up).
fn check_integrity(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let damaged = |what: String| StoreError::Open {
        path: path.to_path_buf(),
        message: damaged_message(path, &what),
    };
    let problems = integrity_problems(conn).map_err(|e| damaged(e.to_string()))?;
    if problems.is_empty() {
        return Ok(());
    }
    let shown = |p: &[String]| {
        let first = crate::text::one_line(&p[0], 200);
        match p.len() {
            1 => format!("integrity_check: {first}"),
            n => format!("integrity_check: {first}, and {} more", n - 1),
        }
    };
    if !index_only(&problems) {
        return Err(damaged(shown(&problems)));
    }
    conn.execute_batch("REINDEX;")
        .map_err(|e| damaged(format!("{}; REINDEX failed: {e}", shown(&problems))))?;
    let left = integrity_problems(conn).map_err(|e| damaged(e.to_string()))?;
    if !left.is_empty() {
        return Err(damaged(shown(&left)));
    }
    tracing::warn!(
        "the database {} had damaged indexes ({}); they were rebuilt with REINDEX, and no row was lost",
        path.display(),
        shown(&problems)
    );
    Ok(())
}

/// Commits a batch; returns why the transaction failed, if it did (a unit that fails alone is
/// told to its caller alone).
fn commit_batch(conn: &mut Connection, batch: &mut Vec<Unit>, sealer: &Sealer) -> Option<String> {
    let mut results: Vec<Result<(), StoreError>> = Vec::with_capacity(batch.len());
    // A unit refused for what it holds (a broken reference) is its caller's; one refused
    // because the database cannot write is everyone's.
    let mut failing = None;
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
                    if failing.is_none() && the_database_fails(&e) {
                        failing = Some(e.to_string());
                    }
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
    outcome.err().map(|e| e.to_string()).or(failing)
}

/// Whether an error says the database cannot take writes at all (locked, full, read-only,
/// failing I/O, damaged), rather than refusing one unit's content.
fn the_database_fails(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::*;
    matches!(
        e.sqlite_error_code(),
        Some(
            DatabaseBusy
                | DatabaseLocked
                | SystemIoFailure
                | DiskFull
                | ReadOnly
                | DatabaseCorrupt
                | CannotOpen
                | NotADatabase
                | OutOfMemory
        )
    )
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
                        .map(|json| sealer.seal(json.expose(), &pending_place("device", &p.state)))
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

    /// A store with two clients and some history, closed.
    async fn filled(path: &Path) {
        let (store, w) = Store::open(path, Sealer::clear()).unwrap();
        for name in ["a", "b"] {
            let writes = vec![
                Write::Client(row(name)),
                Write::Token {
                    client: name.into(),
                    token: Some((token(&format!("at-{name}")), 1)),
                },
                Write::Event(Event {
                    at: 1,
                    client: Some(name.into()),
                    kind: "refreshed".into(),
                    detail: "x".into(),
                }),
            ];
            store.commit(writes).await.unwrap();
        }
        drop(store);
        w.join().unwrap();
    }

    #[tokio::test]
    async fn damaged_indexes_are_rebuilt_and_other_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        filled(&path).await;
        // Two indexes of the same table swap their trees: each holds the other's entries.
        let conn = Connection::open(&path).unwrap();
        let root = |name: &str| -> i64 {
            conn.query_row(
                "SELECT rootpage FROM sqlite_master WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .unwrap()
        };
        let (a, b) = (root("events_at"), root("events_client_at"));
        conn.execute_batch(&format!(
            "PRAGMA writable_schema = ON;
             UPDATE sqlite_master SET rootpage = {b} WHERE name = 'events_at';
             UPDATE sqlite_master SET rootpage = {a} WHERE name = 'events_client_at';"
        ))
        .unwrap();
        drop(conn);
        let conn = Connection::open(&path).unwrap();
        let problems = integrity_problems(&conn).unwrap();
        assert!(
            !problems.is_empty() && index_only(&problems),
            "{problems:?}"
        );
        drop(conn);
        let (store, _w) = Store::open(&path, Sealer::clear()).unwrap();
        assert_eq!(store.load().unwrap().len(), 2, "nothing lost");
        drop(store);

        // Pages of a table overwritten: refused, with the way out, and the file left as it is.
        let broken = dir.path().join("broken.db");
        filled(&broken).await;
        let mut bytes = std::fs::read(&broken).unwrap();
        let page = 4096;
        for b in &mut bytes[page + 8..2 * page] {
            *b = 0x5a;
        }
        std::fs::write(&broken, &bytes).unwrap();
        let e = Store::open(&broken, Sealer::clear())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("damaged") && e.contains(".damaged"), "{e}");
        assert_eq!(
            std::fs::read(&broken).unwrap(),
            bytes,
            "a refused file is not changed"
        );
        let garbage = dir.path().join("garbage.db");
        std::fs::write(&garbage, vec![0x42; 8192]).unwrap();
        let e = Store::open(&garbage, Sealer::clear())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("the database is damaged") && e.contains(".damaged"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_database_deleted_or_replaced_under_the_writer_is_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        filled(&path).await;
        let (store, w) = Store::open(&path, Sealer::clear()).unwrap();
        store.commit(vec![Write::Client(row("c"))]).await.unwrap();
        // Deleted, with its log: the next commit finds out before it writes.
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(companion(&path, "-wal")).unwrap();
        store.commit(vec![Write::Client(row("d"))]).await.unwrap();
        assert_eq!(store.health().rescues, 1);
        let names = |store: &Store| -> Vec<String> {
            store
                .load()
                .unwrap()
                .into_iter()
                .map(|s| s.row.name)
                .collect()
        };
        assert_eq!(names(&store), ["a", "b", "c", "d"]);
        // Replaced by another database: moved aside, ours put back.
        let other = dir.path().join("other.db");
        filled(&other).await;
        std::fs::rename(&other, &path).unwrap();
        store.check_files();
        store.commit(vec![Write::Client(row("e"))]).await.unwrap();
        assert_eq!(store.health().rescues, 2);
        assert_eq!(names(&store), ["a", "b", "c", "d", "e"]);
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                n.starts_with("state.db.replaced-") && !n.ends_with("-wal") && !n.ends_with("-shm")
            })
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        drop(store);
        w.join().unwrap();
        // What is at the path now is complete on its own.
        let (store, _w) = Store::open(&path, Sealer::clear()).unwrap();
        assert_eq!(names(&store), ["a", "b", "c", "d", "e"]);
        let (t, _) = store.load().unwrap()[0].token.clone().unwrap();
        assert_eq!(t.access_token.expose(), "at-a");
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

    #[test]
    fn refuses_another_programs_database_and_leaves_it_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE moz_cookies (id INTEGER); CREATE INDEX by_id ON moz_cookies(id);",
        )
        .unwrap();
        drop(conn);
        let e = Store::open(&path, Sealer::clear())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("a database oauth2mci did not make (it holds by_id, moz_cookies)"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        let conn = Connection::open(&path).unwrap();
        let tables: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .unwrap();
        assert_eq!(tables, 2, "nothing was added to it");
        let journal: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(journal, "delete", "not even switched to WAL");
    }
}
