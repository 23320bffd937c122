//! `cmdflow`: one binary for every role and the client commands, built on the `cmdflow` crate
//! as any binary of yours would be. It carries cmdflow's example kinds (`demo.*`, `quote`,
//! `query`, `membership` and the sales funnels): `cmdflow up` runs them for development, and
//! the other roles only with `CMDFLOW_EXAMPLES=true`.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cmdflow::App::from_env()?
        .examples(cmdflow_demo::install)
        .run_cli()
        .await
}
