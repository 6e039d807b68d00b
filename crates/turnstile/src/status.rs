//! `turnstile status`: a table for people, JSON for programs.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use turnstile_client::{Client, StatusDoc};

pub async fn status(url: &str, name: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let client = Client::connect(url).await?;
    let doc = client.status(name).await?;
    let _ = client.shutdown().await;
    if json {
        println!("{}", String::from_utf8_lossy(&doc.to_json()));
    } else {
        print!("{}", render(&doc));
    }
    if let (Some(name), true) = (name, doc.semaphores.is_empty()) {
        eprintln!("turnstile: no semaphore named {name:?}");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The human-readable table: one line per semaphore, one indented line per holder.
pub fn render(doc: &StatusDoc) -> String {
    let mut out = String::new();
    if doc.semaphores.is_empty() {
        out.push_str("no semaphores\n");
        return out;
    }
    let width = doc
        .semaphores
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(0)
        .max("SEMAPHORE".len());
    let _ = writeln!(
        out,
        "{:<width$}  {:>8}  {:>6}  {:>6}  {:>9}  {:>9}",
        "SEMAPHORE", "CAPACITY", "IN USE", "QUEUED", "ACQUIRED", "EXPIRED"
    );
    for s in &doc.semaphores {
        let closed = if s.closed { "  (closed)" } else { "" };
        let _ = writeln!(
            out,
            "{:<width$}  {:>8}  {:>6}  {:>6}  {:>9}  {:>9}{closed}",
            s.name, s.capacity, s.in_use, s.queued, s.acquired_total, s.expired_total
        );
        for h in &s.holders {
            let age = humantime::format_duration(Duration::from_millis(h.age_ms - h.age_ms % 100));
            let _ = writeln!(
                out,
                "  lease {:<6} session {}  weight {:<3} token {:<8} age {age}",
                h.lease_id, h.session, h.weight, h.token
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use turnstile_client::{HolderStatus, SemaphoreStatus, WaitSummary};

    #[test]
    fn table_lists_semaphores_and_holders() {
        let doc = StatusDoc {
            semaphores: vec![SemaphoreStatus {
                name: "db".into(),
                capacity: 3,
                in_use: 1,
                queued: 2,
                queued_weight: 2,
                closed: false,
                holders: vec![HolderStatus {
                    lease_id: 7,
                    session: "00000000000000ab".into(),
                    client: "host-a:12".into(),
                    weight: 1,
                    token: 42,
                    age_ms: 1_250,
                }],
                acquired_total: 5,
                released_total: 4,
                expired_total: 0,
                timed_out_total: 0,
                lost_total: 0,
                wait: WaitSummary::default(),
            }],
            ..StatusDoc::default()
        };
        let text = render(&doc);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("SEMAPHORE"));
        assert!(lines[1].starts_with("db") && lines[1].contains(" 3 ") && lines[1].contains(" 2 "));
        assert!(
            lines[2].contains("lease 7")
                && lines[2].contains("token 42")
                && lines[2].contains("age 1s 200ms")
        );
        assert_eq!(render(&StatusDoc::default()), "no semaphores\n");
    }
}
