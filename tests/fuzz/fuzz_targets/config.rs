//! The config loader on arbitrary text: it must never panic, every refusal must be one line (it
//! reaches the user as a log line and as `oauth2mci reload`'s answer), and reading through the
//! client blocks must give what parsing the whole document gives.
//!
//! Relative paths resolve under a folder that does not exist, and fuzzing builds never run secret
//! commands (`cfg(fuzzing)` in src/secret.rs), so an input can read files but change nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("/nonexistent/oauth2mci-fuzz/config.yaml");
    let whole = oauth2mci::config::parse(src, file);
    if let Err(e) = &whole {
        let shown = e.to_string();
        assert!(!shown.contains('\n'), "a refusal spans lines: {shown:?}");
        assert!(shown.starts_with(&file.display().to_string()), "{shown:?}");
    }
    // The daemon reads through the client blocks when the layout allows: never differently.
    if let Some(by_blocks) = oauth2mci::config::parse_by_blocks(src, file) {
        assert_eq!(Some(&by_blocks), whole.as_ref().ok(), "blocks and whole document differ");
    }
});
