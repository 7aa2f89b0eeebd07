//! Executing the steps that change a root: RUN, COPY and ADD.
pub mod add;
pub mod copy;
pub mod copy_selection;
pub mod emulation;
pub mod isolation;
pub mod mounts;
pub mod run;
pub mod userns;
pub mod users;
pub mod zygote;
