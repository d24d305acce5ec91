//! Feature flags with Flipper's gate semantics, as GitLab stores them.
//!
//! A flag is open for a project if its boolean gate is on, if the project is
//! one of its actors, or if the project falls inside its percentage of actors
//! (`crc32("<flag name><flipper id>") % 100_000 < percentage * 1_000`, the
//! formula of Flipper's `PercentageOfActors` gate, with GitLab's flipper id
//! `Project:<id>`). A percentage of time is re-drawn on every check.

use std::collections::BTreeSet;

use serde::Serialize;

/// The project-level flag that turns CI job telemetry on.
pub const CI_JOB_TELEMETRY: &str = "ci_job_telemetry";

/// The gates of one flag.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Feature {
    pub boolean: bool,
    pub percentage_of_actors: Option<f64>,
    pub percentage_of_time: Option<f64>,
    /// Flipper ids (`Project:<id>`) of the actors the flag is enabled for.
    pub actors: BTreeSet<String>,
}

/// GitLab's `flipper_id` of a project.
pub fn project_flipper_id(project_id: u64) -> String {
    format!("Project:{project_id}")
}

/// Flipper's percentage-of-actors check.
pub fn percentage_of_actors_open(flag_name: &str, flipper_id: &str, percentage: f64) -> bool {
    const SCALING_FACTOR: f64 = 1_000.0;
    let id = format!("{flag_name}{flipper_id}");
    f64::from(crc32(id.as_bytes()) % 100_000) < percentage * SCALING_FACTOR
}

impl Feature {
    /// Whether the flag is open for the project.
    pub fn enabled_for_project(&self, flag_name: &str, project_id: u64) -> bool {
        if self.boolean {
            return true;
        }
        let flipper_id = project_flipper_id(project_id);
        if self.actors.contains(&flipper_id) {
            return true;
        }
        if let Some(percentage) = self.percentage_of_actors {
            if percentage_of_actors_open(flag_name, &flipper_id, percentage) {
                return true;
            }
        }
        if let Some(percentage) = self.percentage_of_time {
            return rand::random::<f64>() * 100.0 < percentage;
        }
        false
    }

    /// `on`, `off` or `conditional`, as GitLab's Features API reports it.
    pub fn state(&self) -> &'static str {
        if self.boolean {
            "on"
        } else if self.actors.is_empty()
            && self.percentage_of_actors.is_none()
            && self.percentage_of_time.is_none()
        {
            "off"
        } else {
            "conditional"
        }
    }

    /// The feature as GitLab's `GET /api/v4/features` shows it.
    pub fn to_api(&self, name: &str) -> FeatureEntity {
        let mut gates = vec![Gate {
            key: "boolean",
            value: serde_json::json!(self.boolean),
        }];
        if let Some(p) = self.percentage_of_actors {
            gates.push(Gate {
                key: "percentage_of_actors",
                value: percentage_json(p),
            });
        }
        if let Some(p) = self.percentage_of_time {
            gates.push(Gate {
                key: "percentage_of_time",
                value: percentage_json(p),
            });
        }
        if !self.actors.is_empty() {
            gates.push(Gate {
                key: "actors",
                value: serde_json::json!(self.actors),
            });
        }
        FeatureEntity {
            name: name.to_string(),
            state: self.state(),
            gates,
            definition: None,
        }
    }
}

fn percentage_json(p: f64) -> serde_json::Value {
    if p.fract() == 0.0 {
        serde_json::json!(p as u64)
    } else {
        serde_json::json!(p)
    }
}

#[derive(Debug, Serialize)]
pub struct FeatureEntity {
    pub name: String,
    pub state: &'static str,
    pub gates: Vec<Gate>,
    pub definition: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub struct Gate {
    pub key: &'static str,
    pub value: serde_json::Value,
}

/// CRC-32 (IEEE 802.3, the one Ruby's `Zlib.crc32` computes).
pub fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc = TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    crc ^ 0xFFFF_FFFF
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_zlib() {
        // Zlib.crc32("123456789") == 0xCBF43926, the standard check value.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn percentage_of_actors_is_deterministic_and_monotonic() {
        let open_at = |p: f64| {
            (1..=1000u64)
                .filter(|id| {
                    percentage_of_actors_open(CI_JOB_TELEMETRY, &project_flipper_id(*id), p)
                })
                .collect::<Vec<_>>()
        };
        let thirty = open_at(30.0);
        assert_eq!(thirty, open_at(30.0));
        assert!(
            (230..370).contains(&thirty.len()),
            "{} of 1000 at 30%",
            thirty.len()
        );
        let sixty = open_at(60.0);
        assert!(thirty.iter().all(|id| sixty.contains(id)));
        assert!(open_at(0.0).is_empty());
        assert_eq!(open_at(100.0).len(), 1000);
    }

    #[test]
    fn state_follows_the_gates() {
        let mut f = Feature::default();
        assert_eq!(f.state(), "off");
        assert!(!f.enabled_for_project("x", 1));
        f.actors.insert(project_flipper_id(1));
        assert_eq!(f.state(), "conditional");
        assert!(f.enabled_for_project("x", 1));
        assert!(!f.enabled_for_project("x", 2));
        f.boolean = true;
        assert_eq!(f.state(), "on");
        assert!(f.enabled_for_project("x", 2));
    }
}
