//! What Linux's /proc says about processes and sockets: a process's resident
//! memory, this process's open-file limit, and how many TCP connections this
//! process has established to a port.

use std::collections::HashSet;

use anyhow::{bail, Context, Result};

/// `VmRSS` of a process, in KiB.
pub fn rss_kb(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status_kb(&text, "VmRSS").with_context(|| format!("no VmRSS in {path}"))
}

/// A `Key:   1234 kB` line of /proc/PID/status.
pub fn status_kb(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let value = line.strip_prefix(key)?.strip_prefix(':')?;
        let mut parts = value.split_whitespace();
        let number = parts.next()?.parse().ok()?;
        (parts.next() == Some("kB")).then_some(number)
    })
}

/// This process's soft and hard limits of open files (`None`: unlimited).
pub fn open_file_limits() -> Result<(Option<u64>, Option<u64>)> {
    let text = std::fs::read_to_string("/proc/self/limits").context("reading /proc/self/limits")?;
    parse_open_file_limits(&text).context("no `Max open files` line in /proc/self/limits")
}

pub fn parse_open_file_limits(limits: &str) -> Option<(Option<u64>, Option<u64>)> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut parts = line["Max open files".len()..].split_whitespace();
    let mut limit = || -> Option<Option<u64>> {
        match parts.next()? {
            "unlimited" => Some(None),
            n => n.parse().ok().map(Some),
        }
    };
    Some((limit()?, limit()?))
}

/// Fails unless this process may open `needed` files: the soft limit is
/// raised by the caller (`ulimit -n`), since the workspace forbids the
/// unsafe code a `setrlimit` call would need.
pub fn require_open_files(needed: u64) -> Result<()> {
    let (soft, hard) = open_file_limits()?;
    if let Some(soft) = soft {
        if soft < needed {
            let suggest = hard.map_or(needed.max(65536), |h| h.min(needed.max(65536)));
            let hard = hard.map_or("unlimited".to_string(), |h| h.to_string());
            bail!(
                "this needs about {needed} open files and the soft limit is {soft} (hard {hard}): \
                 run `ulimit -n {suggest}` first (the server needs as many)"
            );
        }
    }
    Ok(())
}

/// The TCP connections of this process in state ESTABLISHED whose remote
/// port is `port`: its socket inodes (/proc/self/fd) matched against the
/// network namespace's tables (/proc/net/tcp and tcp6).
pub fn established_to_port(port: u16) -> Result<usize> {
    let mut inodes = HashSet::new();
    for entry in std::fs::read_dir("/proc/self/fd").context("reading /proc/self/fd")? {
        let Ok(entry) = entry else { continue };
        // An fd closed since the listing: skip it.
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if let Some(inode) = socket_inode(&target.to_string_lossy()) {
            inodes.insert(inode);
        }
    }
    let mut count = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        match std::fs::read_to_string(table) {
            Ok(text) => count += count_established(&text, port, &inodes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {table}")),
        }
    }
    Ok(count)
}

/// `socket:[12345]` → 12345.
pub fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Rows of a /proc/net/tcp table in state 01 (ESTABLISHED), with remote port
/// `port` and an inode among `inodes`.
pub fn count_established(table: &str, port: u16, inodes: &HashSet<u64>) -> usize {
    table
        .lines()
        .skip(1)
        .filter(|row| {
            let fields: Vec<&str> = row.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode …
            if fields.len() < 10 || fields[3] != "01" {
                return false;
            }
            let remote_port = fields[2]
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            remote_port == Some(port)
                && fields[9]
                    .parse::<u64>()
                    .is_ok_and(|inode| inodes.contains(&inode))
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kb_lines_of_status() {
        let status = "Name:\tflywheel\nVmHWM:\t   90112 kB\nVmRSS:\t   81920 kB\nThreads:\t4\n";
        assert_eq!(status_kb(status, "VmRSS"), Some(81920));
        assert_eq!(status_kb(status, "VmHWM"), Some(90112));
        assert_eq!(status_kb(status, "Threads"), None);
        assert_eq!(status_kb(status, "VmSwap"), None);
    }

    #[test]
    fn reads_the_open_file_limits() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             95000                95000                processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(
            parse_open_file_limits(limits),
            Some((Some(1024), Some(524288)))
        );
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_open_file_limits(unlimited), Some((None, None)));
        assert_eq!(
            parse_open_file_limits("Max processes 1 1 processes\n"),
            None
        );
    }

    #[test]
    fn counts_only_established_rows_to_the_port_owned_by_us() {
        // Port 8080 = 0x1F90; state 01 = ESTABLISHED, 0A = LISTEN, 06 = TIME_WAIT.
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 100 1 0 100 0 0 10 0\n\
   1: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 201 1 0 20 4 30 10 -1\n\
   2: 0100007F:D432 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 202 1 0 20 4 30 10 -1\n\
   3: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 301 1 0 20 4 30 10 -1\n\
   4: 0100007F:D433 0100007F:1F90 06 00000000:00000000 03:00000000 00000000     0        0 0 3 0 0 0 0 0 0\n\
   5: 0100007F:D434 0100007F:1F91 01 00000000:00000000 00:00000000 00000000     0        0 203 1 0 20 4 30 10 -1\n\
   6: 0100007F:D435 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 999 1 0 20 4 30 10 -1\n";
        let ours: HashSet<u64> = [201, 202, 203, 301].into_iter().collect();
        // Rows 1 and 2: row 3 is the server's side (remote port is ours), row
        // 4 is TIME_WAIT, row 5 another port, row 6 another process.
        assert_eq!(count_established(table, 8080, &ours), 2);
        assert_eq!(count_established(table, 8081, &ours), 1);
        assert_eq!(count_established(table, 8080, &HashSet::new()), 0);
    }

    #[test]
    fn socket_links_name_their_inode() {
        assert_eq!(socket_inode("socket:[12345]"), Some(12345));
        assert_eq!(socket_inode("pipe:[12345]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
    }

    #[test]
    fn sees_its_own_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let before = established_to_port(port).unwrap();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_server_side, _) = listener.accept().unwrap();
        // The accepted socket's remote port is the client's, not `port`.
        assert_eq!(established_to_port(port).unwrap(), before + 1);
        drop(client);
        assert!(rss_kb(std::process::id()).unwrap() > 0);
    }
}
