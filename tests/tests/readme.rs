//! The README's command sequences work pasted in order on a fresh `./dev up` stack: `tests/readme/run.sh` starts
//! one (free ports, temporary state), checks that a second `./dev up` refuses at once and that the token files are
//! 0600, then runs every README shell block marked for the local stack (and the Kubernetes snippet's grpcurl calls)
//! and fails on the first error.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use fhirgw_e2e::workspace;

#[tokio::test]
async fn the_readme_examples_run_as_pasted() {
    let script = workspace().join("tests/readme/run.sh");
    let run = tokio::process::Command::new(&script).current_dir(workspace()).kill_on_drop(true).output();
    let out = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("tests/readme/run.sh did not finish within 300 s")
        .expect("running tests/readme/run.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tests/readme/run.sh failed ({}):\n{stderr}", out.status);
    assert!(stderr.contains("README blocks ran without an error"), "{stderr}");
}
