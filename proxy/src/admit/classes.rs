//! The classes in matching order: which class a request belongs to.

use std::sync::Arc;

use kache_config::{ClassLimits, ClientMatch, LimitsConfig, DEFAULT_CLASS};

use super::{metrics::AdmitMetrics, queue::Class, Demand, EXEMPT_PATHS};

/// The classes in matching order, swapped whole on reconfiguration.
pub(super) struct Table {
    pub(super) exempt: ClientMatch,
    pub(super) classes: Vec<(ClientMatch, Arc<Class>)>,
    pub(super) default: Arc<Class>,
}

impl Table {
    /// Builds the classes of `config`, reusing (and updating) those of
    /// `previous` that keep their name, so their queues and seats carry over.
    pub(super) fn build(config: &LimitsConfig, metrics: &AdmitMetrics, previous: Option<&Table>) -> Table {
        let class = |name: &str, limits: &ClassLimits| match previous.and_then(|t| t.find(name)) {
            Some(class) => {
                class.set_limits(limits.clone());
                class.clone()
            }
            None => Arc::new(Class::new(name, limits.clone(), metrics)),
        };
        Table {
            exempt: config.exempt.clone(),
            classes: config
                .classes
                .iter()
                .map(|c| (c.matches.clone(), class(&c.name, &c.limits)))
                .collect(),
            default: class(DEFAULT_CLASS, &config.default),
        }
    }

    pub(super) fn find(&self, name: &str) -> Option<&Arc<Class>> {
        std::iter::once(&self.default)
            .chain(self.classes.iter().map(|(_, c)| c))
            .find(|c| &*c.name == name)
    }

    /// The class a request belongs to; `None` when it is exempt.
    pub(super) fn class_of(&self, demand: &Demand<'_>) -> Option<&Arc<Class>> {
        let matches = |m: &ClientMatch| m.matches(demand.user, demand.user_agent, demand.path);
        if is_exempt_path(demand.path) || matches(&self.exempt) {
            return None;
        }
        let class = self.classes.iter().find(|(m, _)| matches(m)).map(|(_, c)| c);
        Some(class.unwrap_or(&self.default))
    }
}

pub(super) fn is_exempt_path(path: &str) -> bool {
    EXEMPT_PATHS.iter().any(|p| {
        path.strip_prefix(p)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}
