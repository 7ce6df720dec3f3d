//! No configuration, however large or strange, makes the real daemon use unbounded memory or
//! time: aliases that multiply, deep nesting, huge files and scalars, files that are not files.
//! Each is refused by `check-config` and by a running daemon's `reload` (with file:line:column
//! where the text has one), quickly and in bounded memory, while the daemon keeps serving.

use crate::common::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// The daemon's resident memory, in KiB.
fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

fn client(name: &str, extra: &str) -> String {
    format!(
        "  {name}:\n    client_id: {name}\n    provider: {{token_url: \"https://t.example/\", authorize_url: \"https://a.example/\"}}\n{extra}"
    )
}

#[test]
fn configurations_past_the_limits_are_refused_in_bounded_time_and_memory() {
    let daemon = Daemon::start("", &client("a", ""));
    let good = daemon.config_text();
    let file = daemon.config.display().to_string();
    let prefix = "paths:\n  state: state\n  runtime: run\nclients:\n";

    let mut wide = format!(
        "{prefix}{}",
        client(
            "a",
            &format!(
                "    scopes: &s [{}]\n",
                (0..50_000)
                    .map(|i| format!("s{i}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        )
    );
    for i in 0..2_000 {
        wide.push_str(&client(&format!("c{i}"), "    scopes: *s\n"));
    }
    let mut laughs = format!(
        "{prefix}{}",
        client("a", "    scopes: &a0 [x, x, x, x, x, x, x, x, x, x]\n")
    );
    for i in 1..9 {
        let refs = vec![format!("*a{}", i - 1); 10].join(", ");
        laughs.push_str(&client(
            &format!("l{i}"),
            &format!("    authorize_params: &a{i} {{k: [{refs}]}}\n"),
        ));
    }
    let long_scalar = format!(
        "{prefix}{}",
        client(
            "a",
            &format!(
                "    scopes: [&big \"{}\", {}]\n",
                "x".repeat(512 << 10),
                vec!["*big"; 100].join(", ")
            )
        )
    );
    let huge_scalar = format!(
        "{prefix}{}",
        client(
            "a",
            &format!("    client_secret: {}\n", "x".repeat(2 << 20))
        )
    );
    let deep_flow = format!(
        "{prefix}{}",
        client(
            "a",
            &format!(
                "    scopes: {}{}\n",
                "[".repeat(500_000),
                "]".repeat(500_000)
            )
        )
    );
    let mut deep_block = format!("{prefix}{}    authorize_params:\n", client("a", ""));
    for i in 0..2_000 {
        deep_block.push_str(&format!("{}k{i}:\n", " ".repeat(6 + i)));
    }
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "an anchored list aliased by 2,000 clients",
            wide,
            "anchors and aliases expand the file",
        ),
        (
            "aliases of aliases, nine deep",
            laughs,
            "anchors and aliases expand the file",
        ),
        (
            "a 512 KiB scalar aliased 100 times",
            long_scalar,
            "MiB of text",
        ),
        (
            "a 2 MiB plain scalar",
            huge_scalar,
            "a value longer than 1 MiB",
        ),
        (
            "500,000 open brackets",
            deep_flow,
            "nested deeper than 32 levels",
        ),
        (
            "2,000 nested maps",
            deep_block,
            "nested deeper than 32 levels",
        ),
    ];
    let before = rss_kib(daemon.pid());
    for (what, yaml, why) in &cases {
        std::fs::write(&daemon.config, yaml).unwrap();
        let begun = Instant::now();
        let o = daemon.cli(&["reload"]);
        let took = begun.elapsed();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{what}: {err}");
        assert!(
            err.contains(&format!("{file}:")) && err.contains(why),
            "{what}: {err}"
        );
        let placed = err
            .trim_start_matches("oauth2mci: ")
            .trim_start_matches(&file);
        assert!(
            placed.starts_with(':') && placed[1..].starts_with(|c: char| c.is_ascii_digit()),
            "{what}: no line:column in {err}"
        );
        assert!(took < Duration::from_secs(20), "{what} took {took:?}");
        let o = std::process::Command::new(BIN)
            .arg("check-config")
            .arg(&daemon.config)
            .output()
            .unwrap();
        assert!(
            stderr(&o).contains(why),
            "check-config, {what}: {}",
            stderr(&o)
        );
        assert_eq!(daemon.get("/v1/health").unwrap().0, 200, "{what}");
        let rss = rss_kib(daemon.pid());
        assert!(
            rss < before + 300 * 1024,
            "{what}: {rss} KiB resident, {before} KiB before"
        );
    }

    // Files that are not configurations: too large (sparse, so nothing is written), a FIFO
    // (reading would wait for a writer forever), a folder, a device. The text has no place.
    let replace = |make: &dyn Fn(&Path)| {
        let _ = std::fs::remove_file(&daemon.config);
        let _ = std::fs::remove_dir(&daemon.config);
        make(&daemon.config);
    };
    type Make = Box<dyn Fn(&Path)>;
    let shapes: Vec<(&str, Make, &str)> = vec![
        (
            "600 MiB",
            Box::new(|p: &Path| {
                std::fs::File::create(p)
                    .unwrap()
                    .set_len(600 << 20)
                    .unwrap();
            }),
            "more than the 512 MiB a configuration may take",
        ),
        (
            "a FIFO",
            Box::new(|p: &Path| {
                nix::unistd::mkfifo(p, nix::sys::stat::Mode::S_IRWXU).unwrap();
            }),
            "is a FIFO, not a regular file",
        ),
        (
            "a folder",
            Box::new(|p: &Path| std::fs::create_dir(p).unwrap()),
            "is a folder, not a regular file",
        ),
        (
            "a link to a device",
            Box::new(|p: &Path| {
                std::os::unix::fs::symlink("/dev/zero", p).unwrap();
            }),
            "is a device, not a regular file",
        ),
    ];
    for (what, make, why) in &shapes {
        replace(make.as_ref());
        let begun = Instant::now();
        let o = daemon.cli(&["reload"]);
        assert_eq!(o.status.code(), Some(1), "{what}: {}", stderr(&o));
        assert!(stderr(&o).contains(why), "{what}: {}", stderr(&o));
        assert!(begun.elapsed() < Duration::from_secs(5), "{what}");
        assert_eq!(daemon.get("/v1/health").unwrap().0, 200, "{what}");
    }
    replace(&|p: &Path| std::fs::write(p, &good).unwrap());
    let o = daemon.cli(&["reload"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}
