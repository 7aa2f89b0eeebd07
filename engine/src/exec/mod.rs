//! Executing the steps that change a root: RUN and COPY.
pub mod copy;
pub mod run;
pub mod users;
