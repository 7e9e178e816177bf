//! Incidents as an event-sourced aggregate, fed by detections, with read
//! models beside it (CQRS).
//!
//! Alerts for one entity (a user, host or address) of one tenant within a
//! window make one incident; people assign, resolve and reopen it. Every
//! change is an event (`IncidentCreated`, `AlertAttached`,
//! `IncidentEscalated`, `IncidentAssigned`, `IncidentResolved`,
//! `IncidentReopened`, see `schemas/incidents.avsc`), and the incident's
//! state is the fold of its events, versioned and idempotent by event id.
//!
//! * [`model`]: events, state and the fold;
//! * [`operator`]: the shard that decides and applies events, logs and
//!   snapshots them, and emits the read models' changes;
//! * [`plan`]: the step's prepare queries and checks;
//! * [`config`]: the step as written in a pipeline file.
//!
//! The operator is keyed by `(tenant_id, entity_type, entity_id)`, so an
//! entity's incidents live on one subtask and its events apply in order.

pub mod config;
pub mod model;
pub mod operator;
pub mod plan;

#[cfg(test)]
mod tests;

pub use config::{AlertInput, EscalationRule, IncidentsConfig};
pub use model::{event_schema, state_schema, Event, EventKind, Incident, Severity, Status};
pub use operator::{
    risk_schema, summary_schema, Alert, IncidentFactory, IncidentSpec, Projection, OPEN, RISK,
    SUMMARY,
};
pub use plan::{plan_incidents, PlannedIncidents};
