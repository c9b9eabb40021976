//! The wrapper's descendants as `/proc` shows them (Linux): the agent and everything it started,
//! including payloads in sessions of their own and orphans reparented to the wrapper (it is a
//! child subreaper). Used to stop, continue and kill the whole tree and to count its CPU time.

use std::collections::{HashMap, HashSet};

/// Clock ticks per second of the `/proc/<pid>/stat` times.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Send `sig` to `pid`, a process of our own tree (a positive pid); one gone meanwhile is
/// fine: there is nothing left to signal.
pub fn signal(pid: i32, sig: libc::c_int) -> std::io::Result<()> {
    // SAFETY: kill only sends a signal to one positive pid of our own tree.
    if unsafe { libc::kill(pid, sig) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ESRCH) {
        Ok(())
    } else {
        Err(e)
    }
}

/// In a child between fork and exec: ask for `signal` when the parent (the wrapper's thread
/// that forked) ends, and fail if the parent is already gone (the child was reparented to init
/// before prctl took effect). Calls only prctl and getppid, both async-signal-safe, and
/// allocates nothing, so it may run in a `pre_exec` closure.
pub fn die_with_parent(signal: libc::c_int) -> std::io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag of the calling process.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } == 1 {
        return Err(std::io::Error::other("the wrapper died during start"));
    }
    Ok(())
}

/// CPU seconds (user + system) from getrusage: `libc::RUSAGE_SELF` for this process,
/// `libc::RUSAGE_CHILDREN` for its reaped descendants. 0 if the call fails.
pub fn rusage_cpu(who: libc::c_int) -> f64 {
    // SAFETY: rusage is plain data; all-zero is a valid value for getrusage to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage; the result is checked.
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return 0.0;
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// One process.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Proc {
    pub pid: i32,
    pub ppid: i32,
    /// The state letter: `R`, `S`, `T` (stopped), `Z` (zombie), …
    pub state: char,
    /// CPU seconds of the process and of its reaped children.
    pub cpu_seconds: f64,
}

impl Proc {
    /// Stopped by a signal (or traced).
    pub fn stopped(&self) -> bool {
        matches!(self.state, 'T' | 't')
    }

    /// Dead, not yet reaped.
    pub fn dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

/// Parse `/proc/<pid>/stat`. The command name may hold any byte, so fields are read after the
/// last `)`.
pub fn parse(pid: i32, stat: &str) -> Option<Proc> {
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_ascii_whitespace().collect();
    // After the name: state(3) ppid(4) … utime(14) stime(15) cutime(16) cstime(17).
    let state = fields.first()?.chars().next()?;
    let ppid = fields.get(1)?.parse().ok()?;
    let mut ticks = 0u64;
    for i in 11..=14 {
        ticks = ticks.saturating_add(fields.get(i)?.parse::<i64>().ok()?.max(0) as u64);
    }
    Some(Proc {
        pid,
        ppid,
        state,
        cpu_seconds: ticks as f64 / ticks_per_second(),
    })
}

/// Every process readable now (those exiting while we look are skipped).
pub fn scan() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            parse(
                pid,
                &std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?,
            )
        })
        .collect()
}

/// The descendants of `root` in `procs` (not `root` itself), parents before children.
pub fn descendants(procs: &[Proc], root: i32) -> Vec<Proc> {
    let mut children: HashMap<i32, Vec<&Proc>> = HashMap::new();
    for p in procs {
        children.entry(p.ppid).or_default().push(p);
    }
    let mut out = Vec::new();
    let mut seen = HashSet::from([root]);
    let mut queue = vec![root];
    while let Some(pid) = queue.pop() {
        for c in children.get(&pid).into_iter().flatten() {
            if seen.insert(c.pid) {
                out.push(**c);
                queue.push(c.pid);
            }
        }
    }
    out
}

/// This process's descendants now.
pub fn mine() -> Vec<Proc> {
    descendants(&scan(), std::process::id() as i32)
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => parse(pid, &stat).is_some_and(|p| !p.dead()),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_with_odd_names() {
        let line = "123 (a) b) (c) T 1 123 123 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 1 0 1000 0 0";
        let p = parse(123, line).unwrap();
        assert_eq!((p.pid, p.ppid, p.state), (123, 1, 'T'));
        assert!(p.stopped() && !p.dead());
        let ticks = ticks_per_second();
        assert!((p.cpu_seconds - 310.0 / ticks).abs() < 1e-9);
        assert_eq!(parse(1, "garbage"), None);
        assert_eq!(parse(1, "1 (x) R"), None);
    }

    #[test]
    fn rusage_counts_this_process() {
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(rusage_cpu(libc::RUSAGE_SELF) > 0.0);
        assert_eq!(rusage_cpu(-99), 0.0, "a bad argument is 0, not a panic");
    }

    #[test]
    fn descendants_follow_parents_only() {
        let p = |pid, ppid| Proc {
            pid,
            ppid,
            state: 'S',
            cpu_seconds: 0.0,
        };
        let procs = [p(10, 1), p(11, 10), p(12, 11), p(13, 1), p(14, 12)];
        let d: Vec<i32> = descendants(&procs, 10).iter().map(|p| p.pid).collect();
        assert_eq!(d.len(), 3);
        assert!(d.contains(&11) && d.contains(&12) && d.contains(&14));
        assert!(descendants(&procs, 13).is_empty());
    }

    #[test]
    fn this_process_and_its_child_are_seen() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        assert!(alive(pid));
        assert!(mine().iter().any(|p| p.pid == pid));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!alive(pid));
    }
}
