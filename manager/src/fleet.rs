//! The fleet: which agents the manager has heard from, under which XMPP address they are online,
//! and which jobs they hold. In memory only: leases in the queue are the durable truth; this is
//! what the API and the presence handling need to map XMPP addresses to agent names.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use copilot_protocol::api::{AgentList, AgentView, BoincVolunteer};
use copilot_protocol::sandbox::SandboxReport;
use copilot_protocol::JobId;

/// Now as unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Now as unix seconds.
pub fn now_secs() -> u64 {
    now_ms() / 1000
}

#[derive(Debug, Default)]
struct Entry {
    /// Full JID while online.
    jid: Option<String>,
    /// Bare JID the agent name is bound to (first one seen).
    bare: String,
    version: String,
    running: BTreeSet<JobId>,
    jobs_done: u64,
    last_seen_ms: u64,
    sandbox: Option<SandboxReport>,
    /// The BOINC volunteer of its latest done report that named one.
    volunteer: Option<BoincVolunteer>,
}

/// Why an agent's stanza was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    #[error("agent name {name:?} belongs to {owner}, not {claimed}")]
    NameTaken {
        name: String,
        owner: String,
        claimed: String,
    },
}

/// The agents the manager knows.
#[derive(Debug, Default)]
pub struct Fleet {
    agents: Mutex<HashMap<String, Entry>>,
}

fn bare_of(jid: &str) -> &str {
    jid.split('/').next().unwrap_or(jid)
}

impl Fleet {
    /// An empty fleet.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding this lock leaves plain data behind; keep serving.
        self.agents.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An agent spoke from `jid`, calling itself `name`. An agent name stays bound to the bare
    /// JID that first used it, so one account cannot report for another's jobs.
    pub fn seen(&self, name: &str, jid: &str, version: Option<&str>) -> Result<(), FleetError> {
        let mut agents = self.lock();
        let e = agents.entry(name.to_owned()).or_insert_with(|| Entry {
            bare: bare_of(jid).to_owned(),
            ..Entry::default()
        });
        if e.bare != bare_of(jid) {
            return Err(FleetError::NameTaken {
                name: name.to_owned(),
                owner: e.bare.clone(),
                claimed: bare_of(jid).to_owned(),
            });
        }
        e.jid = Some(jid.to_owned());
        if let Some(v) = version {
            e.version = v.to_owned();
        }
        e.last_seen_ms = now_ms();
        Ok(())
    }

    /// The agent name that is online as `jid`, or, after a reconnect with a new resource, the
    /// one agent bound to its bare JID.
    /// Bind `name` to the account of `jid` (whoever had it before): for an agent that proved
    /// its name with a token, as anonymous agents get a new JID on every login.
    pub fn adopt(&self, name: &str, jid: &str) {
        let mut agents = self.lock();
        let e = agents.entry(name.to_owned()).or_default();
        if e.bare != bare_of(jid) {
            e.bare = bare_of(jid).to_owned();
            e.jid = Some(jid.to_owned());
        }
    }

    pub fn name_of(&self, jid: &str) -> Option<String> {
        let agents = self.lock();
        if let Some((n, _)) = agents.iter().find(|(_, e)| e.jid.as_deref() == Some(jid)) {
            return Some(n.clone());
        }
        let mut same_account = agents.iter().filter(|(_, e)| e.bare == bare_of(jid));
        match (same_account.next(), same_account.next()) {
            (Some((n, _)), None) => Some(n.clone()),
            _ => None,
        }
    }

    /// Whether `jid` is the address agent `name` is online with now.
    pub fn is_current(&self, name: &str, jid: &str) -> bool {
        self.lock()
            .get(name)
            .is_some_and(|e| e.jid.as_deref() == Some(jid))
    }

    /// `jid` came online: if it is the only agent of its account, it is that agent's new address.
    pub fn rebind(&self, jid: &str) {
        let mut agents = self.lock();
        let mut same_account = agents.values_mut().filter(|e| e.bare == bare_of(jid));
        if let (Some(e), None) = (same_account.next(), same_account.next()) {
            e.jid = Some(jid.to_owned());
            e.last_seen_ms = now_ms();
        }
    }

    /// `jid` went offline; returns the agent's name if it was known.
    pub fn offline(&self, jid: &str) -> Option<String> {
        let mut agents = self.lock();
        let (name, e) = agents
            .iter_mut()
            .find(|(_, e)| e.jid.as_deref() == Some(jid))?;
        e.jid = None;
        e.running.clear();
        Some(name.clone())
    }

    /// The agent holds a lease on `job`.
    pub fn started(&self, name: &str, job: JobId) {
        if let Some(e) = self.lock().get_mut(name) {
            e.running.insert(job);
        }
    }

    /// The agent no longer holds `job`; `completed` counts it as done by this agent.
    pub fn finished(&self, name: &str, job: JobId, completed: bool) {
        if let Some(e) = self.lock().get_mut(name) {
            e.running.remove(&job);
            if completed {
                e.jobs_done += 1;
            }
        }
    }

    /// The sandbox the agent reported for a job it ran; reports of payloads that never
    /// started (empty) leave the last one in place.
    pub fn sandbox(&self, name: &str, report: &SandboxReport) {
        if report.is_empty() {
            return;
        }
        if let Some(e) = self.lock().get_mut(name) {
            e.sandbox = Some(report.clone());
        }
    }

    /// The BOINC volunteer a done report of the agent named (reports without one leave the
    /// last one in place).
    pub fn volunteer(&self, name: &str, v: Option<&copilot_protocol::wire::Volunteer>) {
        let Some(v) = v else { return };
        if let Some(e) = self.lock().get_mut(name) {
            e.volunteer = Some(BoincVolunteer {
                user_id: v.user_id,
                host_id: v.host_id,
                team_id: v.team_id,
            });
        }
    }

    /// Forget that any agent holds `job` (its lease expired).
    pub fn drop_job(&self, job: JobId) {
        for e in self.lock().values_mut() {
            e.running.remove(&job);
        }
    }

    /// Number of agents online now.
    pub fn online_count(&self) -> usize {
        self.lock().values().filter(|e| e.jid.is_some()).count()
    }

    /// All known agents, online first, then by name.
    pub fn list(&self) -> AgentList {
        let mut agents: Vec<AgentView> = self
            .lock()
            .iter()
            .map(|(name, e)| AgentView {
                name: name.clone(),
                jid: e.jid.clone(),
                online: e.jid.is_some(),
                version: e.version.clone(),
                running: e.running.iter().copied().collect(),
                jobs_done: e.jobs_done,
                last_seen_ms: e.last_seen_ms,
                sandbox: e.sandbox.clone(),
                // Agents do not tell the manager whom they compute for yet (BOINC wrapper).
                volunteer: e.volunteer,
            })
            .collect();
        agents.sort_by(|a, b| b.online.cmp(&a.online).then_with(|| a.name.cmp(&b.name)));
        AgentList { agents }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_bound_to_their_account() {
        let f = Fleet::new();
        f.seen("a1", "a1@localhost/r1", Some("0.1")).unwrap();
        f.seen("a1", "a1@localhost/r2", None).unwrap();
        assert_eq!(f.name_of("a1@localhost/r2").as_deref(), Some("a1"));
        // A new resource of the same account is the same agent.
        assert_eq!(f.name_of("a1@localhost/r3").as_deref(), Some("a1"));
        f.rebind("a1@localhost/r3");
        assert_eq!(f.list().agents[0].jid.as_deref(), Some("a1@localhost/r3"));
        assert!(f.is_current("a1", "a1@localhost/r3"));
        assert!(!f.is_current("a1", "a1@localhost/r2"));
        assert_eq!(f.offline("a1@localhost/r2"), None);
        let err = f.seen("a1", "rogue@localhost/x", None).unwrap_err();
        assert!(matches!(err, FleetError::NameTaken { .. }));
    }

    #[test]
    fn offline_clears_jobs_and_lists_last() {
        let f = Fleet::new();
        f.seen("b", "b@h/1", Some("1")).unwrap();
        f.seen("a", "a@h/1", Some("1")).unwrap();
        f.started("a", 7);
        assert_eq!(f.list().agents[0].running, vec![7]);
        assert_eq!(f.offline("a@h/1").as_deref(), Some("a"));
        assert_eq!(f.offline("a@h/1"), None);
        let list = f.list().agents;
        assert_eq!((list[0].name.as_str(), list[0].online), ("b", true));
        assert_eq!((list[1].name.as_str(), list[1].online), ("a", false));
        assert!(list[1].running.is_empty());
        f.finished("b", 1, true);
        assert_eq!(f.list().agents[0].jobs_done, 1);
        assert_eq!(f.list().agents[0].sandbox, None);
        let lacking = SandboxReport {
            missing: [copilot_protocol::sandbox::Protection::Uid].into(),
            ..SandboxReport::default()
        };
        f.sandbox("b", &lacking);
        f.sandbox("b", &SandboxReport::default());
        assert_eq!(f.list().agents[0].sandbox.as_ref(), Some(&lacking));
        assert_eq!(f.list().agents[0].volunteer, None);
        let v = copilot_protocol::wire::Volunteer {
            user_id: 42,
            host_id: 7,
            team_id: 3,
            host_token: None,
        };
        f.volunteer("b", Some(&v));
        f.volunteer("b", None);
        let shown = f.list().agents[0].volunteer;
        assert_eq!(
            shown.map(|v| (v.user_id, v.host_id, v.team_id)),
            Some((42, 7, 3))
        );
        assert_eq!(f.online_count(), 1);
    }
}
