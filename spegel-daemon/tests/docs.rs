//! `docs/operations.md` is the one place every bound and switch is listed: each visible long
//! flag of every subcommand, and its environment variable, must appear there in backticks, and
//! every flag named there must still exist.
use std::{collections::BTreeSet, fs, path::Path};

use clap::CommandFactory as _;
use spegel::config::Cli;

fn operations() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md");
    fs::read_to_string(&path).unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()))
}

/// Every visible long flag (`--name`) and environment variable of `command` and its
/// subcommands, `help` and `version` aside.
fn switches(command: &clap::Command, out: &mut BTreeSet<String>) {
    for arg in command.get_arguments() {
        if arg.is_hide_set() {
            continue;
        }
        if let Some(long) = arg.get_long()
            && !matches!(long, "help" | "version")
        {
            out.insert(format!("--{long}"));
        }
        if let Some(env) = arg.get_env() {
            out.insert(env.to_string_lossy().into_owned());
        }
    }
    for sub in command.get_subcommands() {
        switches(sub, out);
    }
}

#[test]
fn every_flag_and_variable_is_in_the_operations_guide() {
    let doc = operations();
    let mut all = BTreeSet::new();
    switches(&Cli::command(), &mut all);
    assert!(all.len() > 50, "only {} switches found", all.len());
    let missing: Vec<_> = all
        .iter()
        .filter(|name| !doc.contains(&format!("`{name}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/operations.md does not list {missing:?}"
    );
}

#[test]
fn the_operations_guide_names_no_flag_that_does_not_exist() {
    let doc = operations();
    let mut all = BTreeSet::new();
    switches(&Cli::command(), &mut all);
    let named: BTreeSet<_> = doc
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|quoted| quoted.starts_with("--") || quoted.starts_with("SPEGEL_"))
        .map(str::to_owned)
        .collect();
    let stale: Vec<_> = named.difference(&all).collect();
    assert!(
        stale.is_empty(),
        "docs/operations.md names {stale:?}, which no command has"
    );
}
