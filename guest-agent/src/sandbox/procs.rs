//! Finding a job's processes in `/proc`, so that none survives the job: daemons that left the
//! payload's process group and session are found by uid (when the job has its own uid), by
//! ancestry, or as orphans reparented to the agent (a child subreaper).

use std::collections::HashSet;
use std::io;

/// One process as `/proc` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ProcInfo {
    pub pid: i32,
    pub ppid: i32,
    pub pgrp: i32,
    pub sid: i32,
    /// Real uid.
    pub uid: u32,
    /// Dead but not yet reaped.
    pub zombie: bool,
}

/// Every process whose stat and status could be read (processes exit while we look; those
/// are skipped).
pub(crate) fn scan() -> io::Result<Vec<ProcInfo>> {
    let mut out = Vec::new();
    let (mut stat, mut status) = (Vec::with_capacity(1024), Vec::with_capacity(4096));
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if read_proc_file(&format!("/proc/{pid}/stat"), &mut stat).is_err()
            || read_proc_file(&format!("/proc/{pid}/status"), &mut status).is_err()
        {
            continue;
        }
        // Command names are any bytes (a process may write its own): never skip one for that.
        let (stat, status) = (
            String::from_utf8_lossy(&stat),
            String::from_utf8_lossy(&status),
        );
        if let (Some(info), Some(uid)) = (parse_stat(pid, &stat), parse_uid(&status)) {
            out.push(ProcInfo { uid, ..info });
        }
    }
    Ok(out)
}

/// The whole of a small `/proc` file into `buf` (cleared first). `/proc` files have no size,
/// so this reads in page-sized chunks until the end: one read for a stat or status file,
/// where `read_to_end` asks for the size, probes, and grows its buffer in several reads.
fn read_proc_file(path: &str, buf: &mut Vec<u8>) -> io::Result<()> {
    use std::io::Read;
    buf.clear();
    let mut file = std::fs::File::open(path)?;
    let mut chunk = [0u8; 4096];
    loop {
        match file.read(&mut chunk)? {
            0 => return Ok(()),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Parses `/proc/<pid>/stat`; the command name (in parentheses) may hold any byte, so the
/// fields are read after the last `)`. The uid is left 0.
pub(crate) fn parse_stat(pid: i32, text: &str) -> Option<ProcInfo> {
    let rest = text.rsplit_once(')')?.1;
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    let sid = fields.next()?.parse().ok()?;
    Some(ProcInfo {
        pid,
        ppid,
        pgrp,
        sid,
        uid: 0,
        zombie: state == "Z" || state == "X",
    })
}

/// The real uid from `/proc/<pid>/status`.
pub(crate) fn parse_uid(text: &str) -> Option<u32> {
    text.lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Who belongs to one job.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Membership {
    /// The payload's first process; also its process group and session id.
    pub leader: i32,
    /// The job's own uid, if it has one: every process of that uid is the job's.
    pub uid: Option<u32>,
    /// The agent's pid; never a member.
    pub me: i32,
}

/// The job's processes among `procs`: those of its uid, group or session, the leader, orphans
/// reparented to the agent that are not another job's leader (only without a job uid, where
/// nothing better tells jobs apart), and every descendant of those.
pub(crate) fn members(procs: &[ProcInfo], m: Membership, leaders: &HashSet<i32>) -> Vec<ProcInfo> {
    let own = |p: &ProcInfo| {
        if p.pid == m.me || p.pid <= 1 {
            return false;
        }
        let by_uid = m.uid.is_some_and(|u| p.uid == u);
        let by_group =
            m.leader > 1 && (p.pid == m.leader || p.pgrp == m.leader || p.sid == m.leader);
        let orphan = m.uid.is_none() && p.ppid == m.me && !leaders.contains(&p.pid);
        by_uid || by_group || orphan
    };
    let mut set: HashSet<i32> = procs.iter().filter(|p| own(p)).map(|p| p.pid).collect();
    loop {
        let more: Vec<i32> = procs
            .iter()
            .filter(|p| p.pid != m.me && p.pid > 1 && !set.contains(&p.pid))
            .filter(|p| set.contains(&p.ppid))
            .map(|p| p.pid)
            .collect();
        if more.is_empty() {
            break;
        }
        set.extend(more);
    }
    procs
        .iter()
        .filter(|p| set.contains(&p.pid))
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: i32, ppid: i32, pgrp: i32, sid: i32, uid: u32) -> ProcInfo {
        ProcInfo {
            pid,
            ppid,
            pgrp,
            sid,
            uid,
            zombie: false,
        }
    }

    #[test]
    fn stat_with_odd_command_names_parses() {
        let s = "42 (a) b (c)) S 7 42 42 0 -1 4194560 0";
        let info = parse_stat(42, s).unwrap();
        assert_eq!(
            (info.ppid, info.pgrp, info.sid, info.zombie),
            (7, 42, 42, false)
        );
        assert!(parse_stat(1, "1 (x) Z 0 1 1").unwrap().zombie);
        assert_eq!(parse_stat(1, "garbage"), None);
        assert_eq!(
            parse_uid("Name:\tsh\nUid:\t61000\t61000\t61000\t61000\n"),
            Some(61000)
        );
    }

    #[test]
    fn membership_follows_uid_group_orphans_and_descendants() {
        let me = 10;
        let procs = [
            p(me, 1, me, me, 0),
            p(20, me, 20, 20, 0), // the leader
            p(21, 20, 20, 20, 0), // in its group
            p(30, me, 30, 30, 0), // an orphan daemon (own session), reparented to us
            p(31, 30, 30, 30, 0), // its child
            p(40, me, 40, 40, 0), // another job's leader
            p(41, 40, 40, 40, 0), // another job's child
            p(50, 1, 50, 50, 99), // a process of the job uid, elsewhere
            p(60, 1, 60, 60, 0),  // unrelated
        ];
        let leaders: HashSet<i32> = [20, 40].into();
        let pids = |uid| -> Vec<i32> {
            let m = Membership {
                leader: 20,
                uid,
                me,
            };
            members(&procs, m, &leaders).iter().map(|p| p.pid).collect()
        };
        assert_eq!(pids(None), [20, 21, 30, 31]);
        // With a job uid, orphans count only by uid (other jobs' orphans are told apart).
        assert_eq!(pids(Some(99)), [20, 21, 50]);
    }
}
