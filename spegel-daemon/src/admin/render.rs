//! The status as people read it: a plain HTML page (no script, no external asset: it works
//! from a node over an SSH tunnel and in a text browser) and the text `spegel status` prints.
use std::fmt::Write as _;

use super::status::Status;
use crate::metrics::recent::ServedRecord;

/// The page at `/`.
pub fn page(status: &Status) -> String {
    let mut html = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>spegel status</title>\n<style>\
         body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}\
         td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}\
         .ready{color:#070}.not-ready{color:#b00}code{font-size:90%}\
         </style></head><body>\n<h1>spegel</h1>\n",
    );
    if status.ready {
        html.push_str("<p id=\"readiness\" class=\"ready\"><strong>Ready</strong></p>\n");
    } else {
        html.push_str(
            "<p id=\"readiness\" class=\"not-ready\"><strong>Not ready</strong></p>\n<ul>\n",
        );
        for reason in &status.reasons {
            let _ = writeln!(html, "<li>{}</li>", escape(reason));
        }
        html.push_str("</ul>\n");
    }
    if !status.warnings.is_empty() {
        html.push_str("<ul id=\"warnings\">\n");
        for warning in &status.warnings {
            let _ = writeln!(html, "<li>Warning: {}</li>", escape(warning));
        }
        html.push_str("</ul>\n");
    }

    html.push_str("<h2>Node</h2>\n<table id=\"node\">\n");
    row(
        &mut html,
        "Peer id",
        status.peer_id.as_deref().unwrap_or("(no router)"),
    );
    row(&mut html, "Interception", &interception(status));
    match &status.ca {
        Some(ca) => {
            row(
                &mut html,
                "Node CA",
                ca.trusted_fingerprint
                    .as_deref()
                    .unwrap_or("(none trusted yet)"),
            );
            row(
                &mut html,
                "containerd trusts it",
                if ca.containerd_trusts { "yes" } else { "no" },
            );
            if let Some(next) = &ca.next_fingerprint {
                row(&mut html, "Next CA (waiting)", next);
            }
        }
        None => row(&mut html, "Node CA", "not used (interception off)"),
    }
    row(
        &mut html,
        "Keys advertised",
        &status.advertised_keys.to_string(),
    );
    row(
        &mut html,
        "Routing table",
        &format!("{} peers", status.routing_table_size),
    );
    html.push_str("</table>\n");

    let _ = writeln!(
        html,
        "<h2>Peers ({})</h2>\n<table id=\"peers\">\n<tr><th>Peer id</th><th>Addresses</th>\
         <th>Registry</th></tr>",
        status.peers.len()
    );
    for peer in &status.peers {
        let _ = writeln!(
            html,
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
            escape(&peer.id),
            escape(&peer.addresses.join(", ")),
            escape(peer.registry.as_deref().unwrap_or("-"))
        );
    }
    html.push_str("</table>\n");

    let _ = writeln!(
        html,
        "<h2>Last {} objects served</h2>\n<table id=\"recent\">\n<tr><th>Object</th>\
         <th>Source</th><th>Status</th><th>Size</th><th>Duration</th><th>Speed</th></tr>",
        status.recent.len()
    );
    for record in &status.recent {
        let _ = writeln!(
            html,
            "<tr><td><code>{} {}</code></td><td class=\"source\">{}</td><td>{}{}</td>\
             <td>{}</td><td>{:.1} ms</td><td>{}/s</td></tr>",
            escape(&record.method),
            escape(&record.path),
            escape(&record.source),
            record.status,
            if record.complete { "" } else { " (aborted)" },
            bytes(record.bytes as f64),
            record.duration_ms,
            bytes(record.bytes_per_sec())
        );
    }
    html.push_str("</table>\n</body></html>\n");
    html
}

/// What `spegel status` prints.
pub fn text(status: &Status) -> String {
    let mut out = String::new();
    if status.ready {
        out.push_str("ready\n");
    } else {
        out.push_str("NOT READY\n");
        for reason in &status.reasons {
            let _ = writeln!(out, "  - {reason}");
        }
    }
    for warning in &status.warnings {
        let _ = writeln!(out, "warning: {warning}");
    }
    let _ = writeln!(
        out,
        "peer id:       {}",
        status.peer_id.as_deref().unwrap_or("(no router)")
    );
    let _ = writeln!(out, "interception:  {}", interception(status));
    match &status.ca {
        Some(ca) => {
            let _ = writeln!(
                out,
                "node CA:       {} (containerd trusts it: {})",
                ca.trusted_fingerprint
                    .as_deref()
                    .unwrap_or("none trusted yet"),
                if ca.containerd_trusts { "yes" } else { "no" }
            );
            if let Some(next) = &ca.next_fingerprint {
                let _ = writeln!(out, "next CA:       {next} (waiting for containerd)");
            }
        }
        None => out.push_str("node CA:       not used (interception off)\n"),
    }
    let _ = writeln!(
        out,
        "peers:         {} connected, {} in the routing table; {} keys advertised",
        status.peers.len(),
        status.routing_table_size,
        status.advertised_keys
    );
    for peer in &status.peers {
        let _ = writeln!(
            out,
            "  {} {} (registry {})",
            peer.id,
            peer.addresses.join(","),
            peer.registry.as_deref().unwrap_or("-")
        );
    }
    let _ = writeln!(out, "last {} objects served:", status.recent.len());
    for record in status.recent.iter().take(10) {
        let _ = writeln!(out, "  {}", served_line(record));
    }
    out
}

fn served_line(record: &ServedRecord) -> String {
    format!(
        "{:<8} {} {} {} {:>10} {:>8.1} ms {:>10}/s{}",
        record.source,
        record.status,
        record.method,
        record.path,
        bytes(record.bytes as f64),
        record.duration_ms,
        bytes(record.bytes_per_sec()),
        if record.complete { "" } else { " (aborted)" }
    )
}

fn interception(status: &Status) -> String {
    let i = &status.interception;
    match (i.enabled, &i.cgroup) {
        (false, _) => "off (mirror mode)".to_owned(),
        (true, Some(cgroup)) => format!("attached to {cgroup}"),
        (true, None) => "NOT attached".to_owned(),
    }
}

fn row(html: &mut String, name: &str, value: &str) {
    let _ = writeln!(
        html,
        "<tr><th>{}</th><td>{}</td></tr>",
        escape(name),
        escape(value)
    );
}

/// `n` bytes, in binary units.
fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Text for HTML element content and attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::status::{CaStatus, Interception, PeerEntry};

    fn status() -> Status {
        Status {
            ready: true,
            reasons: Vec::new(),
            warnings: Vec::new(),
            peer_id: Some("12D3KooWPeer".to_owned()),
            interception: Interception {
                enabled: true,
                attached: true,
                cgroup: Some("/sys/fs/cgroup/system.slice/containerd.service".to_owned()),
            },
            ca: Some(CaStatus {
                trusted_fingerprint: Some("ab:cd".to_owned()),
                next_fingerprint: None,
                containerd_trusts: true,
            }),
            peers: vec![PeerEntry {
                id: "12D3KooWOther".to_owned(),
                addresses: vec!["/ip4/10.0.0.2/tcp/5001".to_owned()],
                registry: Some("10.0.0.2:5000".to_owned()),
            }],
            routing_table_size: 1,
            advertised_keys: 42,
            recent: vec![ServedRecord {
                at_unix_ms: 1,
                method: "GET".to_owned(),
                path: "/v2/<script>/blobs/sha256:aa".to_owned(),
                source: "peer".to_owned(),
                status: 200,
                bytes: 2 * 1024 * 1024,
                duration_ms: 500.0,
                complete: true,
            }],
        }
    }

    #[test]
    fn the_page_shows_every_part_escaped_and_without_script() {
        let html = page(&status());
        for needle in [
            "<strong>Ready</strong>",
            "attached to /sys/fs/cgroup/system.slice/containerd.service",
            "ab:cd",
            "<th>containerd trusts it</th><td>yes</td>",
            "<th>Keys advertised</th><td>42</td>",
            "Peers (1)",
            "12D3KooWOther",
            "10.0.0.2:5000",
            "Last 1 objects served",
            "&lt;script&gt;",
            "<td class=\"source\">peer</td>",
            "2.0 MiB",
            "500.0 ms",
            "4.0 MiB/s",
        ] {
            assert!(html.contains(needle), "no {needle:?} in\n{html}");
        }
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("http://") && !html.contains("https://"));
    }

    #[test]
    fn not_ready_lists_the_reasons() {
        let mut status = status();
        status.ready = false;
        status.reasons = vec!["interception is <off>".to_owned()];
        status.interception.cgroup = None;
        let html = page(&status);
        assert!(html.contains("Not ready") && html.contains("interception is &lt;off&gt;"));
        let text = text(&status);
        assert!(
            text.starts_with("NOT READY\n  - interception is <off>\n"),
            "{text}"
        );
        assert!(text.contains("interception:  NOT attached"), "{text}");
    }

    #[test]
    fn the_text_names_sources_sizes_and_speeds() {
        let text = text(&status());
        assert!(text.starts_with("ready\n"), "{text}");
        assert!(text.contains("node CA:       ab:cd (containerd trusts it: yes)"));
        assert!(text.contains("1 connected, 1 in the routing table; 42 keys advertised"));
        assert!(
            text.contains("peer     200 GET /v2/<script>/blobs/sha256:aa"),
            "{text}"
        );
        assert!(text.contains("4.0 MiB/s"), "{text}");
    }

    #[test]
    fn sizes_are_binary() {
        assert_eq!(bytes(0.0), "0 B");
        assert_eq!(bytes(1023.0), "1023 B");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(bytes(3.0 * 1024.0 * 1024.0 * 1024.0), "3.0 GiB");
    }
}
