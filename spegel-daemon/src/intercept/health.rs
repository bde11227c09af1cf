//! Wedge detection, as a pure decision: from samples of the interception listener's health (did
//! it accept a probe in time, does it have a free connection slot), when to bypass it (detach the
//! eBPF programs, so containerd connects directly) and when to trust it again (re-attach). Both
//! sides have hysteresis: a listener is bypassed only once it has been unhealthy for the whole
//! `wedge_timeout`, and trusted again only once it has been healthy for the whole
//! `recover_after`, so a brief stall or a flapping listener does not flip the programs.
use std::{fmt, time::Duration};

use tokio::time::Instant;

/// The thresholds of the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Unhealthy without a break for this long: bypass.
    pub wedge_timeout: Duration,
    /// Healthy again without a break for this long: re-attach.
    pub recover_after: Duration,
}

/// One look at the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Every probe connection was accepted within its deadline.
    pub accepted: bool,
    /// Connection slots left (the accept loop waits for one before it accepts).
    pub free_slots: usize,
}

impl Sample {
    /// What is wrong, if anything.
    pub fn trouble(&self) -> Option<Trouble> {
        if self.free_slots == 0 {
            Some(Trouble::NoFreeSlots)
        } else if !self.accepted {
            Some(Trouble::NotAccepting)
        } else {
            None
        }
    }
}

/// Why a listener is unhealthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trouble {
    /// Every connection slot is taken: new connections wait in the backlog.
    NoFreeSlots,
    /// A probe connection was not accepted in time.
    NotAccepting,
}

impl fmt::Display for Trouble {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NoFreeSlots => "every connection slot is taken",
            Self::NotAccepting => "it does not accept connections",
        })
    }
}

/// What to do with the programs after a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The listener has been wedged for the wedge timeout: detach (containerd goes direct).
    Bypass(Trouble),
    /// The listener has been healthy for the recovery time: attach again.
    Restore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The programs may be attached; `since`: when the current unhealthy stretch began.
    Trusted { unhealthy_since: Option<Instant> },
    /// The listener is bypassed; `since`: when the current healthy stretch began.
    Bypassed { healthy_since: Option<Instant> },
}

/// The decision's state: is the listener trusted, and for how long has it been (un)healthy.
#[derive(Debug, Clone)]
pub struct HealthWatch {
    policy: HealthPolicy,
    state: State,
}

impl HealthWatch {
    /// A trusted listener.
    pub fn new(policy: HealthPolicy) -> Self {
        Self {
            policy,
            state: State::Trusted {
                unhealthy_since: None,
            },
        }
    }

    /// Whether the listener is currently bypassed (the programs must stay detached).
    pub fn bypassed(&self) -> bool {
        matches!(self.state, State::Bypassed { .. })
    }

    /// Takes `sample`, taken at `at` (samples come in time order), and says whether to flip.
    pub fn observe(&mut self, at: Instant, sample: Sample) -> Option<Action> {
        let trouble = sample.trouble();
        match &mut self.state {
            State::Trusted { unhealthy_since } => {
                let Some(trouble) = trouble else {
                    *unhealthy_since = None;
                    return None;
                };
                let since = *unhealthy_since.get_or_insert(at);
                if at.saturating_duration_since(since) < self.policy.wedge_timeout {
                    return None;
                }
                self.state = State::Bypassed {
                    healthy_since: None,
                };
                Some(Action::Bypass(trouble))
            }
            State::Bypassed { healthy_since } => {
                if trouble.is_some() {
                    *healthy_since = None;
                    return None;
                }
                let since = *healthy_since.get_or_insert(at);
                if at.saturating_duration_since(since) < self.policy.recover_after {
                    return None;
                }
                self.state = State::Trusted {
                    unhealthy_since: None,
                };
                Some(Action::Restore)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: HealthPolicy = HealthPolicy {
        wedge_timeout: Duration::from_secs(5),
        recover_after: Duration::from_secs(10),
    };

    const OK: Sample = Sample {
        accepted: true,
        free_slots: 8,
    };
    const NOT_ACCEPTING: Sample = Sample {
        accepted: false,
        free_slots: 8,
    };
    const FULL: Sample = Sample {
        accepted: true,
        free_slots: 0,
    };
    const FULL_AND_STUCK: Sample = Sample {
        accepted: false,
        free_slots: 0,
    };

    /// Feeds `(second, sample)` rows and returns the actions, with the second they came at.
    fn run(rows: &[(u64, Sample)]) -> Vec<(u64, Action)> {
        let start = Instant::now();
        let mut watch = HealthWatch::new(POLICY);
        let mut actions = Vec::new();
        for &(second, sample) in rows {
            if let Some(action) = watch.observe(start + Duration::from_secs(second), sample) {
                actions.push((second, action));
            }
            // `bypassed` always agrees with the last action.
            let expect_bypassed = matches!(actions.last(), Some((_, Action::Bypass(_))));
            assert_eq!(watch.bypassed(), expect_bypassed, "at {second}s");
        }
        actions
    }

    #[test]
    fn trouble_of_a_sample() {
        assert_eq!(OK.trouble(), None);
        assert_eq!(NOT_ACCEPTING.trouble(), Some(Trouble::NotAccepting));
        assert_eq!(FULL.trouble(), Some(Trouble::NoFreeSlots));
        assert_eq!(FULL_AND_STUCK.trouble(), Some(Trouble::NoFreeSlots));
    }

    #[test]
    fn decisions() {
        let bypass = |t| Action::Bypass(t);
        type Case<'a> = (&'a str, &'a [(u64, Sample)], &'a [(u64, Action)]);
        let table: &[Case] = &[
            (
                "healthy: nothing happens",
                &[(0, OK), (10, OK), (100, OK)],
                &[],
            ),
            (
                "progress: accepting and slots free, never bypassed",
                &[
                    (0, OK),
                    (1, OK),
                    (2, OK),
                    (3, OK),
                    (4, OK),
                    (5, OK),
                    (6, OK),
                ],
                &[],
            ),
            (
                "no progress for the whole wedge timeout: bypassed once",
                &[
                    (0, NOT_ACCEPTING),
                    (2, NOT_ACCEPTING),
                    (4, NOT_ACCEPTING),
                    (5, NOT_ACCEPTING),
                    (6, NOT_ACCEPTING),
                    (9, NOT_ACCEPTING),
                ],
                &[(5, bypass(Trouble::NotAccepting))],
            ),
            (
                "no progress for less than the wedge timeout: not bypassed",
                &[(0, NOT_ACCEPTING), (4, NOT_ACCEPTING), (5, OK), (6, OK)],
                &[],
            ),
            (
                "a healthy sample restarts the unhealthy stretch",
                &[
                    (0, NOT_ACCEPTING),
                    (4, NOT_ACCEPTING),
                    (5, OK),
                    (6, NOT_ACCEPTING),
                    (10, NOT_ACCEPTING),
                    (11, NOT_ACCEPTING),
                ],
                &[(11, bypass(Trouble::NotAccepting))],
            ),
            (
                "every slot taken for the wedge timeout: bypassed",
                &[(0, FULL), (3, FULL), (5, FULL)],
                &[(5, bypass(Trouble::NoFreeSlots))],
            ),
            (
                "slots and accepting troubles form one unhealthy stretch",
                &[(0, FULL), (3, NOT_ACCEPTING), (5, FULL_AND_STUCK)],
                &[(5, bypass(Trouble::NoFreeSlots))],
            ),
            (
                "hysteresis: re-attached only after healthy for the recovery time",
                &[
                    (0, NOT_ACCEPTING),
                    (5, NOT_ACCEPTING),
                    (6, OK),
                    (10, OK),
                    (15, OK),
                    (16, OK),
                    (17, OK),
                ],
                &[(5, bypass(Trouble::NotAccepting)), (16, Action::Restore)],
            ),
            (
                "hysteresis: a relapse while bypassed restarts the recovery time",
                &[
                    (0, NOT_ACCEPTING),
                    (5, NOT_ACCEPTING),
                    (6, OK),
                    (14, OK),
                    (15, FULL),
                    (16, OK),
                    (25, OK),
                    (26, OK),
                ],
                &[(5, bypass(Trouble::NotAccepting)), (26, Action::Restore)],
            ),
            (
                "after a restore, a new wedge needs a whole wedge timeout again",
                &[
                    (0, NOT_ACCEPTING),
                    (5, NOT_ACCEPTING),
                    (6, OK),
                    (16, OK),
                    (17, NOT_ACCEPTING),
                    (21, NOT_ACCEPTING),
                    (22, NOT_ACCEPTING),
                ],
                &[
                    (5, bypass(Trouble::NotAccepting)),
                    (16, Action::Restore),
                    (22, bypass(Trouble::NotAccepting)),
                ],
            ),
        ];
        for (name, rows, expected) in table {
            assert_eq!(run(rows), *expected, "{name}");
        }
    }
}
