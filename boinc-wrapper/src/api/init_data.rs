//! `init_data.xml`: what the client tells the application when it starts it (written into the
//! slot dir by `write_init_data_file` in the client's `lib/app_ipc.cpp`). Parsed with serde and
//! quick-xml into [`InitData`]; fields this crate does not use (host_info, proxy_info,
//! global_preferences, …) are ignored, the file size is bounded, and numbers are checked.

use std::path::Path;

use serde::Deserialize;

/// The file's name in the slot dir.
pub const INIT_DATA_FILE: &str = "init_data.xml";
/// Largest init_data.xml read.
pub const MAX_INIT_DATA: usize = 1 << 20;

/// Why init_data.xml could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InitDataError {
    #[error("cannot read {INIT_DATA_FILE}: {0}")]
    Read(std::io::Error),
    #[error("{INIT_DATA_FILE} has {0} bytes, more than {MAX_INIT_DATA}")]
    TooLarge(usize),
    #[error("{INIT_DATA_FILE} is not valid: {0}")]
    Parse(String),
    #[error("{INIT_DATA_FILE}: {field} = {value} is out of range")]
    OutOfRange { field: &'static str, value: String },
}

/// The parts of init_data.xml a wrapper needs. Every field is optional in the file.
#[derive(Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct InitData {
    pub major_version: i32,
    pub minor_version: i32,
    pub release: i32,
    /// The app version number (e.g. 100 for 1.00).
    pub app_version: i32,
    pub app_name: String,
    /// The volunteer's account id on the project.
    pub userid: i64,
    pub teamid: i64,
    /// This computer's id on the project (0 before the first scheduler contact).
    pub hostid: i64,
    pub user_name: String,
    pub team_name: String,
    /// The volunteer's account key on the project: a secret, never to be passed on.
    pub authenticator: String,
    pub project_dir: String,
    pub boinc_dir: String,
    pub wu_name: String,
    pub result_name: String,
    /// -1 (or absent): shared memory is the mmap'ed file; else a System V key.
    pub shm_key: Option<i32>,
    pub slot: i32,
    /// The client's process id; 0 if unknown.
    pub client_pid: i64,
    /// CPU seconds the task used in earlier runs.
    pub wu_cpu_time: f64,
    /// Seconds the task ran in earlier runs.
    pub starting_elapsed_time: f64,
    /// Seconds between checkpoints the volunteer asked for (`disk_interval`).
    pub checkpoint_period: f64,
    pub fraction_done_start: f64,
    pub fraction_done_end: f64,
    pub rsc_fpops_est: f64,
    pub rsc_memory_bound: f64,
    pub rsc_disk_bound: f64,
    /// Unix time by which the result should be reported.
    pub computation_deadline: f64,
    pub ncpus: f64,
}

impl std::fmt::Debug for InitData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitData")
            .field("app_name", &self.app_name)
            .field("app_version", &self.app_version)
            .field("userid", &self.userid)
            .field("teamid", &self.teamid)
            .field("hostid", &self.hostid)
            .field("authenticator", &"<redacted>")
            .field("wu_name", &self.wu_name)
            .field("result_name", &self.result_name)
            .field("shm_key", &self.shm_key)
            .field("slot", &self.slot)
            .field("client_pid", &self.client_pid)
            .field("wu_cpu_time", &self.wu_cpu_time)
            .field("starting_elapsed_time", &self.starting_elapsed_time)
            .field("checkpoint_period", &self.checkpoint_period)
            .field("computation_deadline", &self.computation_deadline)
            .finish_non_exhaustive()
    }
}

/// Cut out the `<project_preferences>` block: it holds the project's own XML verbatim (not
/// escaped), which this wrapper does not need and which may not even be well-formed.
fn without_project_preferences(text: &str) -> std::borrow::Cow<'_, str> {
    const OPEN: &str = "<project_preferences>";
    const CLOSE: &str = "</project_preferences>";
    match (text.find(OPEN), text.rfind(CLOSE)) {
        (Some(a), Some(b)) if a < b => {
            let mut s = String::with_capacity(text.len());
            s.push_str(&text[..a]);
            s.push_str(&text[b + CLOSE.len()..]);
            s.into()
        }
        _ => text.into(),
    }
}

impl InitData {
    /// Read `dir/init_data.xml`.
    pub fn load(dir: &Path) -> Result<InitData, InitDataError> {
        use std::io::Read;
        let f = std::fs::File::open(dir.join(INIT_DATA_FILE)).map_err(InitDataError::Read)?;
        let mut bytes = Vec::new();
        f.take(MAX_INIT_DATA as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(InitDataError::Read)?;
        if bytes.len() > MAX_INIT_DATA {
            return Err(InitDataError::TooLarge(bytes.len()));
        }
        Self::parse(&String::from_utf8_lossy(&bytes))
    }

    /// Parse the text of an init_data.xml.
    pub fn parse(text: &str) -> Result<InitData, InitDataError> {
        if text.len() > MAX_INIT_DATA {
            return Err(InitDataError::TooLarge(text.len()));
        }
        let text = without_project_preferences(text);
        let d: InitData = quick_xml::de::from_str(&text)
            .map_err(|e| InitDataError::Parse(e.to_string().chars().take(200).collect()))?;
        d.check()?;
        Ok(d)
    }

    fn check(&self) -> Result<(), InitDataError> {
        let reals = [
            ("wu_cpu_time", self.wu_cpu_time),
            ("starting_elapsed_time", self.starting_elapsed_time),
            ("checkpoint_period", self.checkpoint_period),
            ("fraction_done_start", self.fraction_done_start),
            ("fraction_done_end", self.fraction_done_end),
            ("computation_deadline", self.computation_deadline),
        ];
        for (field, v) in reals {
            if !v.is_finite() || v < 0.0 {
                return Err(InitDataError::OutOfRange {
                    field,
                    value: v.to_string(),
                });
            }
        }
        if self.fraction_done_start > 1.0 || self.fraction_done_end > 1.0 {
            return Err(InitDataError::OutOfRange {
                field: "fraction_done_end",
                value: self.fraction_done_end.to_string(),
            });
        }
        if self.client_pid < 0 || self.client_pid > i64::from(i32::MAX) {
            return Err(InitDataError::OutOfRange {
                field: "client_pid",
                value: self.client_pid.to_string(),
            });
        }
        Ok(())
    }

    /// The range fraction_done is mapped to: `fraction_done_start..fraction_done_end`, or
    /// `0..1` when the client sent none.
    pub fn fraction_range(&self) -> (f64, f64) {
        if self.fraction_done_end > self.fraction_done_start {
            (self.fraction_done_start, self.fraction_done_end)
        } else {
            (0.0, 1.0)
        }
    }

    /// The client's pid, if it told us.
    pub fn client_pid(&self) -> Option<i32> {
        // check() keeps it within 0..=i32::MAX.
        i32::try_from(self.client_pid).ok().filter(|p| *p > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As written by boinc-client 7.20.5 (shortened host and preference blocks).
    pub(crate) const SAMPLE: &str = r#"<app_init_data>
<major_version>7</major_version>
<minor_version>20</minor_version>
<release>5</release>
<app_version>100</app_version>
<userid>42</userid>
<teamid>7</teamid>
<hostid>1</hostid>
<app_name>copilot</app_name>
<project_preferences>
<anything><the project="wants"/>not even &closed</project_preferences>
<team_name>CERN &amp; friends</team_name>
<user_name>Ada</user_name>
<project_dir>/var/lib/boinc/projects/127.0.0.1_9_probe</project_dir>
<boinc_dir>/var/lib/boinc</boinc_dir>
<authenticator>0123456789abcdef</authenticator>
<wu_name>probe_wu_1</wu_name>
<result_name>probe_wu_1_0</result_name>
<shm_key>-1</shm_key>
<slot>0</slot>
<client_pid>4711</client_pid>
<wu_cpu_time>12.500000</wu_cpu_time>
<starting_elapsed_time>30.000000</starting_elapsed_time>
<using_sandbox>0</using_sandbox>
<vm_extensions_disabled>0</vm_extensions_disabled>
<checkpoint_period>5.000000</checkpoint_period>
<fraction_done_start>0.000000</fraction_done_start>
<fraction_done_end>1.000000</fraction_done_end>
<gpu_type></gpu_type>
<ncpus>1.000000</ncpus>
<rsc_fpops_est>40000000000.000000</rsc_fpops_est>
<rsc_fpops_bound>100000000000000.000000</rsc_fpops_bound>
<rsc_memory_bound>100000000.000000</rsc_memory_bound>
<rsc_disk_bound>1000000000.000000</rsc_disk_bound>
<computation_deadline>1767225600.000000</computation_deadline>
<vbox_window>0</vbox_window>
<no_priority_change>0</no_priority_change>
<process_priority>-1</process_priority>
<host_info>
    <timezone>3600</timezone>
    <domain_name>volunteer</domain_name>
    <p_ncpus>2</p_ncpus>
    <coprocs>
    </coprocs>
</host_info>
<proxy_info>
    <socks_server_name></socks_server_name>
</proxy_info>
<global_preferences>
   <run_if_user_active>1</run_if_user_active>
</global_preferences>
</app_init_data>
"#;

    #[test]
    fn a_client_written_file_is_read() {
        let d = InitData::parse(SAMPLE).unwrap();
        assert_eq!((d.userid, d.teamid, d.hostid), (42, 7, 1));
        assert_eq!(d.team_name, "CERN & friends");
        assert_eq!(d.authenticator, "0123456789abcdef");
        assert_eq!(d.result_name, "probe_wu_1_0");
        assert_eq!(d.shm_key, Some(-1));
        assert_eq!(d.client_pid(), Some(4711));
        assert_eq!(d.wu_cpu_time, 12.5);
        assert_eq!(d.starting_elapsed_time, 30.0);
        assert_eq!(d.checkpoint_period, 5.0);
        assert_eq!(d.computation_deadline, 1_767_225_600.0);
        assert_eq!(d.fraction_range(), (0.0, 1.0));
        assert!(!format!("{d:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn bad_files_are_errors() {
        assert!(matches!(
            InitData::parse("<app_init_data><hostid>many</hostid></app_init_data>"),
            Err(InitDataError::Parse(_))
        ));
        assert!(matches!(
            InitData::parse("<app_init_data><wu_cpu_time>-1</wu_cpu_time></app_init_data>"),
            Err(InitDataError::OutOfRange { .. })
        ));
        assert!(matches!(
            InitData::parse("<app_init_data><client_pid>99999999999</client_pid></app_init_data>"),
            Err(InitDataError::OutOfRange { .. })
        ));
        assert!(InitData::parse("<app_init_data><slot>").is_err());
        let huge = "x".repeat(MAX_INIT_DATA + 1);
        assert!(matches!(
            InitData::parse(&huge),
            Err(InitDataError::TooLarge(_))
        ));
        let d = InitData::parse("<app_init_data/>").unwrap();
        assert_eq!(d.client_pid(), None);
        assert_eq!(d.shm_key, None);
    }

    #[test]
    fn mutated_samples_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for _ in 0..2000 {
            let mut bytes = SAMPLE.as_bytes().to_vec();
            for _ in 0..rng.gen_range(1..8) {
                let i = rng.gen_range(0..bytes.len());
                bytes[i] = b"<>/&;x0-."[rng.gen_range(0..9)];
            }
            let _ = InitData::parse(&String::from_utf8_lossy(&bytes));
        }
    }

    #[test]
    fn load_reads_the_slot_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            InitData::load(dir.path()),
            Err(InitDataError::Read(_))
        ));
        std::fs::write(dir.path().join(INIT_DATA_FILE), SAMPLE).unwrap();
        assert_eq!(InitData::load(dir.path()).unwrap().hostid, 1);
    }
}
