//! The square jobs many end-to-end tests run: instance `n` writes `n * n` to `square.txt`
//! after a nap, and [`check_square`] fetches and verifies its result with the CLI.

use copilot_protocol::api::JobView;
use copilot_protocol::JobState;

use crate::Harness;

/// A job file with `count` instances; each naps `sleep` seconds (a `sleep` argument), then writes
/// the square of its instance number.
pub fn squares(count: u32, sleep: &str) -> String {
    format!(
        r#"
name = "square"
command = ["sh", "square.sh"]
outputs = ["square.txt"]
count = {count}
max_retries = 3

[[inputs]]
path = "square.sh"

[env]
NAP = "{sleep}"
"#
    )
}

/// The script the square jobs run.
pub const SQUARE_SH: &str = "sleep \"$NAP\"\nn=$COPILOT_INSTANCE\necho $((n * n)) > square.txt\n";

/// Fetch a job's results with the CLI (which verifies every digest) and check the square.
pub fn check_square(h: &Harness, job: &JobView) {
    assert_eq!(
        job.state,
        JobState::Done,
        "job {}: {:?}",
        job.id,
        job.outcome
    );
    let n: u64 = job.spec.env["COPILOT_INSTANCE"].parse().unwrap();
    let dir = h.results(job.id);
    let got = std::fs::read_to_string(dir.join("square.txt")).unwrap();
    assert_eq!(got.trim(), (n * n).to_string(), "job {}", job.id);
    let declared: Vec<&str> = job.files.iter().map(|f| f.path.as_str()).collect();
    assert!(declared.contains(&"square.txt"), "{declared:?}");
}
