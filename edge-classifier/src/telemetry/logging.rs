//! Log lines for a terminal or for the systemd journal.
//!
//! Under systemd (`JOURNAL_STREAM` set: stdout and stderr are journal streams) every line starts
//! with its syslog priority (`<6>` for info, sd-daemon(3)) and carries no timestamp of its own,
//! since the journal stamps each line already and shows the priority as a level. On a terminal
//! the lines keep env_logger's usual form.

use std::io::Write as _;

/// True when stdout/stderr go to the journal (systemd sets `JOURNAL_STREAM` for a service
/// whose output it connects there).
pub fn to_journal() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some()
}

/// The sd-daemon(3) priority prefix of a level.
pub fn priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// Sets up `log` for the CLI: `RUST_LOG` filters (default `info`).
pub fn init() {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if to_journal() {
        builder.format(|buf, record| {
            writeln!(
                buf,
                "<{}>{}: {}",
                priority(record.level()),
                record.target(),
                record.args()
            )
        });
    }
    builder.init();
}

/// Text for stdout (counter tables): under the journal each line gets the info prefix, so a
/// table never lands there without a level.
pub fn stdout_text(text: &str) -> String {
    if !to_journal() {
        return text.to_string();
    }
    text.lines()
        .map(|l| format!("<{}>{l}\n", priority(log::Level::Info)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(priority(log::Level::Error), 3);
        assert_eq!(priority(log::Level::Warn), 4);
        assert_eq!(priority(log::Level::Info), 6);
        assert_eq!(priority(log::Level::Debug), 7);
    }
}
