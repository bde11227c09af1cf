//! How `node-setup` restarts containerd: a command template (`--restart-command`) with a
//! `{unit}` placeholder, split into words and `&&`-joined steps here rather than by a shell, so
//! the init container needs none and the unit name can never be read as shell syntax.
use std::process::Command;

use anyhow::{Context as _, bail, ensure};

/// The default: reload systemd's units (a changed drop-in is read only then) and restart
/// containerd, in the host's namespaces (the init container runs with `hostPID`).
pub const DEFAULT_RESTART_COMMAND: &str = "nsenter -t 1 -m -u -i -n -p -- systemctl daemon-reload \
     && nsenter -t 1 -m -u -i -n -p -- systemctl restart {unit}";

/// A parsed `--restart-command`: steps run in order, each only if the one before succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartCommand {
    steps: Vec<Vec<String>>,
}

impl RestartCommand {
    /// Parses `template`: words separated by whitespace, `'…'` and `"…"` quote (no escapes
    /// inside single quotes; `\"` and `\\` inside double quotes), a bare `&&` word separates
    /// steps.
    pub fn parse(template: &str) -> anyhow::Result<Self> {
        let mut steps = vec![Vec::new()];
        for word in split_words(template)? {
            match word {
                Word::And => steps.push(Vec::new()),
                Word::Text(text) => {
                    if let Some(step) = steps.last_mut() {
                        step.push(text);
                    }
                }
            }
        }
        ensure!(
            steps.iter().all(|step| !step.is_empty()),
            "--restart-command {template:?} has an empty step"
        );
        Ok(Self { steps })
    }

    /// The steps with `{unit}` replaced by `unit`.
    pub fn for_unit(&self, unit: &str) -> Vec<Vec<String>> {
        self.steps
            .iter()
            .map(|step| {
                step.iter()
                    .map(|word| word.replace("{unit}", unit))
                    .collect()
            })
            .collect()
    }

    /// Runs the steps for `unit`, stopping at the first that fails. Blocking.
    pub fn run(&self, unit: &str) -> anyhow::Result<()> {
        for step in self.for_unit(unit) {
            let (program, args) = step.split_first().context("an empty restart step")?;
            let status = Command::new(program)
                .args(args)
                .status()
                .with_context(|| format!("cannot run `{}`", step.join(" ")))?;
            ensure!(
                status.success(),
                "restarting {unit}: `{}` failed ({status})",
                step.join(" ")
            );
        }
        Ok(())
    }
}

/// Refuses unit names that are not plain systemd unit names.
pub fn check_unit(unit: &str) -> anyhow::Result<()> {
    ensure!(
        !unit.is_empty()
            && !unit.starts_with('-')
            && unit
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ":_.@-\\".contains(c)),
        "--containerd-unit {unit:?} is not a systemd unit name"
    );
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum Word {
    Text(String),
    And,
}

fn split_words(template: &str) -> anyhow::Result<Vec<Word>> {
    let mut words = Vec::new();
    let mut chars = template.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let Some(&first) = chars.peek() else {
            return Ok(words);
        };
        let mut text = String::new();
        let mut quoted = false;
        while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
            match c {
                '\'' => {
                    quoted = true;
                    loop {
                        match chars.next() {
                            Some('\'') => break,
                            Some(c) => text.push(c),
                            None => bail!("unterminated ' in --restart-command"),
                        }
                    }
                }
                '"' => {
                    quoted = true;
                    loop {
                        match chars.next() {
                            Some('"') => break,
                            Some('\\') => match chars.next() {
                                Some(c @ ('"' | '\\')) => text.push(c),
                                Some(c) => {
                                    text.push('\\');
                                    text.push(c);
                                }
                                None => bail!("unterminated \" in --restart-command"),
                            },
                            Some(c) => text.push(c),
                            None => bail!("unterminated \" in --restart-command"),
                        }
                    }
                }
                c => text.push(c),
            }
        }
        debug_assert!(!first.is_whitespace());
        words.push(if !quoted && text == "&&" {
            Word::And
        } else {
            Word::Text(text)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_reloads_then_restarts_in_the_host_namespaces() {
        let command = RestartCommand::parse(DEFAULT_RESTART_COMMAND).unwrap();
        let steps = command.for_unit("containerd.service");
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0][0], "nsenter");
        assert_eq!(steps[0][steps[0].len() - 1], "daemon-reload");
        assert_eq!(
            steps[1][steps[1].len() - 2..],
            ["restart".to_owned(), "containerd.service".to_owned()]
        );
    }

    #[test]
    fn words_quotes_and_steps() {
        let command =
            RestartCommand::parse(r#"  sh -c 'echo {unit} && true' "a \"b\" \x" && x'&&'y "&&" "#)
                .unwrap();
        assert_eq!(
            command.for_unit("k3s.service"),
            [
                vec![
                    "sh".to_owned(),
                    "-c".to_owned(),
                    "echo k3s.service && true".to_owned(),
                    "a \"b\" \\x".to_owned(),
                ],
                vec!["x&&y".to_owned(), "&&".to_owned()],
            ]
        );
        for bad in ["", "a &&", "&& a", "a && && b", "'open", "\"open"] {
            assert!(RestartCommand::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn steps_stop_at_the_first_failure() {
        let dir = tempfile::tempdir().unwrap();
        let mark = dir.path().join("ran");
        let template = format!("false && touch {}", mark.display());
        assert!(RestartCommand::parse(&template).unwrap().run("u").is_err());
        assert!(!mark.exists());
        let template = format!("true && touch {}", mark.display());
        RestartCommand::parse(&template).unwrap().run("u").unwrap();
        assert!(mark.exists());
    }

    #[test]
    fn unit_names_are_plain() {
        for good in ["containerd.service", "k3s-agent.service", "a@b.service"] {
            check_unit(good).unwrap();
        }
        for bad in ["", "-x", "a b", "a;b", "$(x)", "a/b"] {
            assert!(check_unit(bad).is_err(), "{bad:?}");
        }
    }
}
