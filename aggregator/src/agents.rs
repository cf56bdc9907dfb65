//! Per-agent state: who is connected, when each agent was last heard from, what it sent, and
//! which batches were already accepted (so a resend after a lost ack is not applied twice).
//!
//! Exposed as `picket_aggregator_agent_*` metrics, including `picket_aggregator_agent_up`,
//! which turns 0 when an agent misses a few of its collection intervals.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use picket_core::model::{Family, Labels, MetricType};

use crate::config::AgentsConfig;

/// Most sessions remembered per agent for de-duplication. An agent has one session per
/// process start (with a disk spool, one per spool, kept across restarts); older ones can only
/// matter for batches still in flight from before a restart.
const MAX_SESSIONS_PER_AGENT: usize = 4;

#[derive(Debug)]
struct AgentState {
    last_seen: Instant,
    last_seen_wall: SystemTime,
    interval: Duration,
    open_streams: u32,
    batches: u64,
    samples: u64,
    duplicate_batches: u64,
    rejected_batches: u64,
    version: String,
    /// session id -> highest accepted sequence, with the time it was last used.
    sessions: HashMap<u64, (u64, Instant)>,
}

/// What became of an incoming batch's sequence number.
#[derive(Debug, PartialEq, Eq)]
pub enum SequenceCheck {
    New,
    AlreadyAccepted,
}

/// Shared registry of agents, safe to use from every stream.
pub struct Registry {
    config: Mutex<AgentsConfig>,
    agents: Mutex<HashMap<String, AgentState>>,
    rejected_streams: Mutex<HashMap<&'static str, u64>>,
}

impl Registry {
    pub fn new(config: AgentsConfig) -> Self {
        Registry {
            config: Mutex::new(config),
            agents: Mutex::new(HashMap::new()),
            rejected_streams: Mutex::new(HashMap::new()),
        }
    }

    pub fn reconfigure(&self, config: AgentsConfig) {
        *lock(&self.config) = config;
    }

    /// A stream from `agent` said hello.
    pub fn connected(&self, agent: &str, interval: Duration, version: &str) {
        let mut agents = lock(&self.agents);
        let now = Instant::now();
        let state = agents
            .entry(agent.to_owned())
            .or_insert_with(|| AgentState {
                last_seen: now,
                last_seen_wall: SystemTime::now(),
                interval,
                open_streams: 0,
                batches: 0,
                samples: 0,
                duplicate_batches: 0,
                rejected_batches: 0,
                version: String::new(),
                sessions: HashMap::new(),
            });
        state.open_streams += 1;
        state.interval = interval;
        state.version = version.to_owned();
    }

    pub fn disconnected(&self, agent: &str) {
        if let Some(state) = lock(&self.agents).get_mut(agent) {
            state.open_streams = state.open_streams.saturating_sub(1);
        }
    }

    /// Whether batch `sequence` of `session` is new. Does not record it: call
    /// [`Registry::accepted`] once the batch is safe.
    pub fn check_sequence(&self, agent: &str, session: u64, sequence: u64) -> SequenceCheck {
        let agents = lock(&self.agents);
        match agents.get(agent).and_then(|s| s.sessions.get(&session)) {
            Some(&(last, _)) if sequence <= last => SequenceCheck::AlreadyAccepted,
            _ => SequenceCheck::New,
        }
    }

    pub fn accepted(&self, agent: &str, session: u64, sequence: u64, samples: usize) {
        let mut agents = lock(&self.agents);
        let Some(state) = agents.get_mut(agent) else {
            return;
        };
        let now = Instant::now();
        state.last_seen = now;
        state.last_seen_wall = SystemTime::now();
        state.batches += 1;
        state.samples += samples as u64;
        let entry = state.sessions.entry(session).or_insert((0, now));
        *entry = (entry.0.max(sequence), now);
        if state.sessions.len() > MAX_SESSIONS_PER_AGENT
            && let Some(oldest) = state
                .sessions
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(id, _)| *id)
        {
            state.sessions.remove(&oldest);
        }
    }

    pub fn duplicate(&self, agent: &str) {
        if let Some(state) = lock(&self.agents).get_mut(agent) {
            state.duplicate_batches += 1;
            state.last_seen = Instant::now();
            state.last_seen_wall = SystemTime::now();
        }
    }

    pub fn rejected(&self, agent: &str) {
        if let Some(state) = lock(&self.agents).get_mut(agent) {
            state.rejected_batches += 1;
        }
    }

    /// A stream was refused before it had an identity (bad hello, protocol, ...).
    pub fn stream_rejected(&self, reason: &'static str) {
        *lock(&self.rejected_streams).entry(reason).or_insert(0) += 1;
    }

    /// Drops agents silent for longer than `forget_after`.
    pub fn forget_silent(&self) {
        let forget_after = lock(&self.config).forget_after;
        lock(&self.agents)
            .retain(|_, s| s.open_streams > 0 || s.last_seen.elapsed() < forget_after);
    }

    /// The registry as metric families.
    pub fn families(&self) -> Vec<Family> {
        let config = lock(&self.config).clone();
        let agents = lock(&self.agents);
        let ts = picket_core::model::now_ms();
        let mut up = Family::new(
            "picket_aggregator_agent_up",
            MetricType::Gauge,
            "1 while the agent sends batches on schedule, 0 once it missed several intervals.",
        );
        let mut seen = Family::new(
            "picket_aggregator_agent_last_seen_timestamp_seconds",
            MetricType::Gauge,
            "When the agent's last batch arrived (Unix time).",
        );
        let mut streams = Family::new(
            "picket_aggregator_agent_open_streams",
            MetricType::Gauge,
            "Open gRPC streams from the agent.",
        );
        let mut batches = Family::new(
            "picket_aggregator_agent_batches_total",
            MetricType::Counter,
            "Batches accepted from the agent.",
        );
        let mut samples = Family::new(
            "picket_aggregator_agent_samples_total",
            MetricType::Counter,
            "Samples accepted from the agent.",
        );
        let mut duplicates = Family::new(
            "picket_aggregator_agent_duplicate_batches_total",
            MetricType::Counter,
            "Batches the agent resent after a lost ack; acknowledged, not applied twice.",
        );
        let mut rejected = Family::new(
            "picket_aggregator_agent_rejected_batches_total",
            MetricType::Counter,
            "Malformed batches refused from the agent.",
        );
        let mut info = Family::new(
            "picket_aggregator_agent_info",
            MetricType::Gauge,
            "Agent build, from its hello.",
        );
        let mut names: Vec<&String> = agents.keys().collect();
        names.sort();
        for name in names {
            let s = &agents[name];
            let labels = Labels::from_pairs([("agent", name.as_str())]);
            let down_after = (s.interval * config.down_after_intervals).max(config.min_down_after);
            let is_up = s.last_seen.elapsed() <= down_after;
            up.push(labels.clone(), ts, if is_up { 1.0 } else { 0.0 });
            let wall = s
                .last_seen_wall
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            seen.push(labels.clone(), ts, wall);
            streams.push(labels.clone(), ts, s.open_streams as f64);
            batches.push(labels.clone(), ts, s.batches as f64);
            samples.push(labels.clone(), ts, s.samples as f64);
            duplicates.push(labels.clone(), ts, s.duplicate_batches as f64);
            rejected.push(labels.clone(), ts, s.rejected_batches as f64);
            let mut info_labels = labels;
            info_labels.insert("version", s.version.as_str());
            info.push(info_labels, ts, 1.0);
        }
        let mut refused = Family::new(
            "picket_aggregator_streams_refused_total",
            MetricType::Counter,
            "Streams refused before an agent identified itself, by reason.",
        );
        let mut reasons: Vec<_> = lock(&self.rejected_streams)
            .iter()
            .map(|(r, n)| (*r, *n))
            .collect();
        reasons.sort();
        for (reason, n) in reasons {
            refused.push(Labels::from_pairs([("reason", reason)]), ts, n as f64);
        }
        vec![
            up, seen, streams, batches, samples, duplicates, rejected, info, refused,
        ]
    }
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it: the registry holds
/// counters whose worst case after a panic is a slightly stale value.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(families: &[Family], name: &str, agent: &str) -> f64 {
        let family = families.iter().find(|f| f.name == name).unwrap();
        let point = family
            .points
            .iter()
            .find(|p| p.labels.get("agent") == Some(agent))
            .unwrap();
        match point.value {
            picket_core::model::Value::Number(v) => v,
            _ => panic!("not a number"),
        }
    }

    #[test]
    fn dedups_by_session_and_sequence() {
        let r = Registry::new(AgentsConfig::default());
        r.connected("pi", Duration::from_secs(10), "v");
        assert_eq!(r.check_sequence("pi", 1, 1), SequenceCheck::New);
        r.accepted("pi", 1, 1, 10);
        assert_eq!(r.check_sequence("pi", 1, 1), SequenceCheck::AlreadyAccepted);
        assert_eq!(r.check_sequence("pi", 1, 2), SequenceCheck::New);
        // A restarted agent has a new session whose sequence starts again at 1.
        assert_eq!(r.check_sequence("pi", 2, 1), SequenceCheck::New);
        let f = r.families();
        assert_eq!(
            value(&f, "picket_aggregator_agent_samples_total", "pi"),
            10.0
        );
        assert_eq!(value(&f, "picket_aggregator_agent_up", "pi"), 1.0);
    }

    #[test]
    fn agent_goes_down_after_missed_intervals() {
        let r = Registry::new(AgentsConfig {
            down_after_intervals: 2,
            min_down_after: Duration::from_millis(1),
            forget_after: Duration::from_secs(3600),
        });
        r.connected("pi", Duration::from_millis(5), "v");
        r.accepted("pi", 1, 1, 1);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            value(&r.families(), "picket_aggregator_agent_up", "pi"),
            0.0
        );
        r.accepted("pi", 1, 2, 1);
        assert_eq!(
            value(&r.families(), "picket_aggregator_agent_up", "pi"),
            1.0
        );
    }
}
