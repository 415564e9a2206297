//! The planner's decisions, table-driven.
