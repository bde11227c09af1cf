//! Test-only: a switch that wedges the interception accept loop (the daemon stays alive but
//! accepts nothing) while a file exists, so an end-to-end test can wedge a running daemon and
//! end the wedge by creating and removing that file.
use std::{path::PathBuf, time::Duration};

/// How often the file is looked at.
const POLL: Duration = Duration::from_millis(100);

/// Wedges the accept loop while `file` exists.
#[derive(Debug)]
pub struct AcceptWedge {
    file: PathBuf,
}

impl AcceptWedge {
    /// A switch on `file`.
    pub fn new(file: PathBuf) -> Self {
        Self { file }
    }

    fn on(&self) -> bool {
        self.file.exists()
    }

    /// Completes once the switch is on.
    pub async fn engaged(&self) {
        while !self.on() {
            tokio::time::sleep(POLL).await;
        }
    }

    /// Completes at once when the switch is off; else once it is switched off, saying so.
    pub async fn released(&self) {
        if !self.on() {
            return;
        }
        tracing::warn!(file = %self.file.display(), "TEST FAULT: the interception accept loop is wedged");
        while self.on() {
            tokio::time::sleep(POLL).await;
        }
        tracing::warn!(file = %self.file.display(), "TEST FAULT: the interception accept loop is released");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn follows_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("wedge");
        let wedge = AcceptWedge::new(file.clone());
        // Off: released at once; engaged never.
        wedge.released().await;
        let engaged = tokio::time::timeout(Duration::from_millis(300), wedge.engaged()).await;
        assert!(engaged.is_err(), "engaged without the file");
        std::fs::write(&file, b"").unwrap();
        tokio::time::timeout(Duration::from_secs(10), wedge.engaged())
            .await
            .expect("not engaged with the file there");
        let released = tokio::time::timeout(Duration::from_millis(300), wedge.released()).await;
        assert!(released.is_err(), "released while the file exists");
        std::fs::remove_file(&file).unwrap();
        tokio::time::timeout(Duration::from_secs(10), wedge.released())
            .await
            .expect("not released once the file is gone");
    }
}
