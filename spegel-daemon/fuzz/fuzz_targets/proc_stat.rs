//! Files the daemon reads from `/proc` whose text a process chooses: a `/proc/<pid>/stat` line
//! (the command name may hold spaces and parentheses; `tls/trust.rs`) and `/proc/mounts` paths
//! (escaped; `intercept/cgroup.rs`).
//!
//! Asserts: a start time is finite and not negative; unescaping never grows a path and is the
//! identity on text without backslashes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spegel::fuzzing::{start_time_in_stat, unescape_mount_path};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(start) = start_time_in_stat(text, 100.0) {
        assert!(start.is_finite() && start >= 0.0, "{start}");
    }
    let unescaped = unescape_mount_path(text);
    if !text.contains('\\') {
        assert_eq!(unescaped, text);
    } else {
        assert!(unescaped.chars().count() <= text.chars().count());
    }
});
