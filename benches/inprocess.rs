//! In-process figures for BENCHMARKS.md (criterion): what one refresh costs the daemon besides
//! the network, and the pieces that scale with the number of clients.
//!
//! `cargo bench --bench inprocess` (add `-- --quick` for a fast look).

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use oauth2mci::Secret;
use oauth2mci::scheduler::Timers;
use oauth2mci::seal::{Key, Keys, Sealer};
use oauth2mci::store::{ClientRow, Store, Write};
use oauth2mci::token::TokenSet;
use std::sync::Arc;
use std::time::Duration;

const KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn token(n: usize) -> TokenSet {
    TokenSet {
        access_token: Secret::new(format!(
            "ya29.a0AfH6SMB-access-token-{n}-{}",
            "x".repeat(150)
        )),
        token_type: "Bearer".into(),
        refresh_token: Some(Secret::new(format!(
            "1//0refresh-token-{n}-{}",
            "y".repeat(80)
        ))),
        id_token: None,
        scope: Some("https://mail.google.com/".into()),
        expires_at: Some(1_800_000_000_000),
        refresh_expires_at: None,
        obtained_at: 1_700_000_000_000,
        granted_at: 1_700_000_000_000,
        extra: Default::default(),
        refresh_expiry_slides: false,
    }
}

fn row(name: &str) -> ClientRow {
    ClientRow {
        name: name.into(),
        status: "valid".into(),
        fingerprint: "f".repeat(64),
        reason: None,
        last_refresh_at: Some(1_700_000_000_000),
        last_error: None,
        failures: 0,
        removed_at: None,
        updated_at: 1_700_000_000_000,
        warned_for: None,
        refresh_started_at: None,
    }
}

/// The writes of one refresh: the client's row, its token, an event.
fn refresh_unit(name: &str, n: usize) -> Vec<Write> {
    vec![
        Write::Client(row(name)),
        Write::Token {
            client: name.into(),
            token: Some((token(n), n as i64 + 2)),
        },
        Write::Event(oauth2mci::store::Event {
            at: 1_700_000_000_000,
            client: Some(name.into()),
            kind: "refreshed".into(),
            detail: "refreshed; expires in 3599s".into(),
        }),
    ]
}

fn sealing(c: &mut Criterion) {
    let keys = Keys {
        current: Some(Key::parse(KEY).expect("a valid key")),
        old: Vec::new(),
    };
    let sealer = Sealer::new(&keys);
    let t = token(1);
    let access = t.access_token.expose().to_string();
    let refresh = t
        .refresh_token
        .as_ref()
        .map(|r| r.expose().to_string())
        .unwrap_or_default();
    // What a refresh seals: the access and refresh tokens (the id token and kept fields are
    // usually absent).
    c.bench_function("seal: the two tokens of one refresh", |b| {
        b.iter(|| {
            (
                sealer.seal(&access, "tokens.access_token/c1"),
                sealer.seal(&refresh, "tokens.refresh_token/c1"),
            )
        })
    });
    let sealed = sealer.seal(&access, "tokens.access_token/c1");
    c.bench_function(
        "open: one access token (start-up reads one per client)",
        |b| b.iter(|| sealer.open(&sealed, "tokens.access_token/c1")),
    );
}

fn store(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let dir = tempfile::tempdir().expect("a temporary folder");
    let (store, _writer) = runtime
        .block_on(async {
            Store::open(&dir.path().join("state.db"), Sealer::new(&Keys::default()))
        })
        .expect("the store opens");
    let names: Vec<String> = (0..1024).map(|i| format!("c{i}")).collect();
    runtime.block_on(async {
        let rows: Vec<Write> = names.iter().map(|n| Write::Client(row(n))).collect();
        store.commit(rows).await.expect("rows committed");
    });
    let mut group = c.benchmark_group("store");
    group.sample_size(20);
    // One refresh alone: its own transaction and fsync.
    group.bench_function("one refresh committed alone", |b| {
        b.iter(|| {
            runtime
                .block_on(store.commit(refresh_unit("c1", 1)))
                .expect("committed")
        })
    });
    // The refresh intent: the client's row, committed before a rotating refresh goes out.
    group.bench_function("one refresh intent committed alone", |b| {
        b.iter(|| {
            runtime
                .block_on(store.commit(vec![Write::Client(row("c1"))]))
                .expect("committed")
        })
    });
    // 256 refreshes sent at once, as a wave does: group commit shares the fsyncs.
    group.bench_function("256 concurrent refreshes (group commit)", |b| {
        b.iter_batched(
            || {
                (0..256)
                    .map(|i| refresh_unit(&names[i], i))
                    .collect::<Vec<_>>()
            },
            |units| {
                runtime.block_on(async {
                    let commits: Vec<_> = units.into_iter().map(|u| store.commit(u)).collect();
                    for r in futures::future::join_all(commits).await {
                        r.expect("committed");
                    }
                })
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn timers(c: &mut Criterion) {
    let names: Vec<Arc<str>> = (0..100_000).map(|i| Arc::from(format!("c{i}"))).collect();
    let mut timers = Timers::default();
    for (i, n) in names.iter().enumerate() {
        timers.set(n.clone(), i as i64 * 36);
    }
    let mut i = 0usize;
    c.bench_function("timers: move one deadline among 100,000", |b| {
        b.iter(|| {
            i = (i + 7919) % names.len();
            timers.set(names[i].clone(), (i as i64 * 36) ^ 1);
        })
    });
    c.bench_function("timers: pop 1,000 due of 100,000", |b| {
        b.iter_batched(
            || {
                let mut t = Timers::default();
                for (i, n) in names.iter().enumerate() {
                    t.set(n.clone(), i as i64);
                }
                t
            },
            |mut t| {
                // The rest is dropped outside the measurement.
                let due = t.pop_due(999);
                (t, due)
            },
            BatchSize::LargeInput,
        )
    });
}

fn config(c: &mut Criterion) {
    let mut yaml = String::from("paths: {state: /tmp/s, runtime: /tmp/r}\nclients:\n");
    for i in 0..1000 {
        yaml.push_str(&format!(
            "  c{i}: {{provider: {{authorize_url: \"https://a.example/authorize\", token_url: \"https://a.example/token\"}}, client_id: app{i}, scopes: [mail]}}\n"
        ));
    }
    let file = std::path::Path::new("/tmp/bench.yaml");
    let mut group = c.benchmark_group("config");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    group.bench_function("parse 1,000 clients", |b| {
        b.iter(|| oauth2mci::config::parse(&yaml, file).expect("a valid config"))
    });
    // As the daemon reads a file: by client blocks, parsed on every core.
    let dir = tempfile::tempdir().expect("a temporary folder");
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, &yaml).expect("config written");
    group.bench_function("load 1,000 clients", |b| {
        b.iter(|| oauth2mci::config::load(&file).expect("a valid config"))
    });
    let previous = oauth2mci::config::load(&file).expect("a valid config");
    std::fs::write(
        &file,
        yaml.replace("client_id: app500,", "client_id: app500b,"),
    )
    .expect("config edited");
    group.bench_function("reload 1,000 clients, one changed", |b| {
        b.iter(|| oauth2mci::config::reload(&file, &previous).expect("a valid config"))
    });
    group.finish();
}

criterion_group!(benches, sealing, store, timers, config);
criterion_main!(benches);
