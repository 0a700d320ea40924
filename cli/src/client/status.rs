//! `stitch status ID`.

use clap::Args;

use super::ServerArgs;
use crate::Failure;

#[derive(Args)]
pub struct StatusArgs {
    /// The upload's id.
    id: String,
    #[command(flatten)]
    server: ServerArgs,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: StatusArgs) -> Result<(), Failure> {
    let client = args.server.client(5)?;
    let Some(status) = client.status(&args.id).await? else {
        return Err(Failure::Rejected(format!(
            "no upload {:?} on {}",
            args.id, args.server.server
        )));
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).unwrap_or_default()
        );
        return Ok(());
    }
    println!("upload    {}", status.upload_id);
    println!("state     {}", status.state);
    if let Some(name) = &status.filename {
        println!("file      {name}");
    }
    println!(
        "received  {} of {} chunks, {} of {} bytes",
        status.uploaded_chunks.len(),
        status.total_chunks,
        status.bytes_received,
        status.total_size
    );
    if let Some(done) = status
        .merge_bytes_done
        .filter(|_| status.state == "merging")
    {
        println!("merged    {done} of {} bytes", status.total_size);
    }
    if let (Some(md5), Some(url)) = (&status.md5, &status.download_url) {
        println!("md5       {md5}");
        println!("download  {}", client.absolute(url));
    }
    if let Some(reason) = &status.failure_reason {
        println!("failure   {reason}");
    }
    Ok(())
}
