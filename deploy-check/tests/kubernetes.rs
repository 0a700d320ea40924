//! k8s/: every base resource and the rendered example overlay through `kubernetes-validate
//! --strict`; the custom resources (KEDA, prometheus-operator), which it only warns about,
//! checked field by field here; every container's environment through Stitch's own
//! configuration loader (with the keys file it would find mounted); and the numbers that must
//! agree across resources.

use std::collections::BTreeMap;
use std::path::Path;

use stitch_deploy_check::{
    MULTIPART_OVERHEAD, Validator, Yaml, check_config, kustomize, nginx_size, read, repo_path, run,
    stitch_seconds, stitch_size, temp_dir, yaml_docs, yaml_file, yaml_str,
};

const CHECKER: &str = env!("CARGO_BIN_EXE_stitch-config-check");

/// Custom resources: kubernetes-validate has no schema for them and only warns.
const CUSTOM: [(&str, &str); 3] = [
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
];

/// The Kubernetes versions the manifests are checked against: the oldest supported and
/// kubernetes-validate's newest.
const VERSIONS: [&str; 2] = ["1.28.0", "1.37.0"];

fn is_custom(doc: &Yaml) -> bool {
    let api = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    CUSTOM.contains(&(api, kind))
}

fn base_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(repo_path("k8s/base"))
        .expect("k8s/base")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .collect();
    files.sort();
    files
}

fn kubernetes_validate(files: &[&Path], version: &str) -> stitch_deploy_check::Run {
    let mut command = Validator::KubernetesValidate.command();
    command.args(["--strict", "-k", version]).args(files);
    run(&mut command)
}

/// The kustomization `dir` rendered by this crate's renderer (`kustomize build DIR`): the
/// rendered documents and their text.
fn render(dir: &str) -> (String, Vec<Yaml>) {
    let docs = kustomize::build(&repo_path(dir)).unwrap_or_else(|e| panic!("kustomize {dir}: {e}"));
    let text = kustomize::to_yaml(&docs).unwrap_or_else(|e| panic!("kustomize {dir}: {e}"));
    (text, docs)
}

fn find<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind}/{name}"))
}

/// What `kubernetes-validate` must have said of each built-in resource and each custom one.
fn assert_validated(result: &stitch_deploy_check::Run, docs: &[Yaml], what: &str) {
    assert!(result.succeeded(), "{what}: {}", result.output());
    let text = format!("{}{}", result.stdout, result.stderr);
    assert!(!text.contains("ERROR"), "{what}: {}", result.output());
    for doc in docs {
        let kind = yaml_str(&doc["kind"], "kind");
        let name = yaml_str(&doc["metadata"]["name"], "metadata.name");
        if is_custom(doc) {
            assert!(
                text.contains(&format!("Couldn't find schema for kind {kind}")),
                "{what}: expected only a warning for the custom resource {kind}: {}",
                result.output()
            );
        } else {
            let passed = format!("passed for resource {}/{name}", kind.to_lowercase());
            assert!(
                text.contains(&passed),
                "{what}: no '{passed}' in {}",
                result.output()
            );
        }
    }
}

#[test]
fn every_base_resource_validates_strictly_on_its_own() {
    let files = base_files();
    let paths: Vec<_> = files
        .iter()
        .map(|f| repo_path(&format!("k8s/base/{f}")))
        .collect();
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let docs: Vec<Yaml> = files
        .iter()
        .flat_map(|f| yaml_file(&format!("k8s/base/{f}")))
        .collect();
    for file in &files {
        let in_file = yaml_file(&format!("k8s/base/{file}"));
        assert_eq!(in_file.len(), 1, "k8s/base/{file}: one resource per file");
    }
    for version in VERSIONS {
        let result = kubernetes_validate(&refs, version);
        assert_validated(&result, &docs, &format!("k8s/base against {version}"));
    }
}

#[test]
fn the_base_kustomization_lists_every_resource_file() {
    let kustomization = &yaml_file("k8s/base/kustomization.yaml")[0];
    let mut listed: Vec<String> = kustomization["resources"]
        .as_vec()
        .expect("resources")
        .iter()
        .map(|r| yaml_str(r, "resources[]").to_owned())
        .collect();
    listed.sort();
    assert_eq!(listed, base_files());
}

#[test]
fn the_example_overlay_renders_and_validates_strictly() {
    let (text, docs) = render("k8s/overlays/example");
    let dir = temp_dir();
    let rendered = dir.path().join("example.yaml");
    std::fs::write(&rendered, &text).unwrap();
    for version in VERSIONS {
        let result = kubernetes_validate(&[rendered.as_path()], version);
        assert_validated(
            &result,
            &docs,
            &format!("overlay example against {version}"),
        );
    }
    // The overlay's patches took effect.
    let api = find(&docs, "Deployment", "stitch-api");
    assert_eq!(api["spec"]["replicas"].as_i64(), Some(4));
    let image = yaml_str(
        &api["spec"]["template"]["spec"]["containers"][0]["image"],
        "image",
    );
    assert_eq!(image, "registry.example.com/stitch:0.1.0");
    let pvc = find(&docs, "PersistentVolumeClaim", "stitch-data");
    assert_eq!(pvc["spec"]["storageClassName"].as_str(), Some("nfs-client"));
    let ingress = find(&docs, "Ingress", "stitch-api");
    assert_eq!(
        ingress["spec"]["rules"][0]["host"].as_str(),
        Some("uploads.example.org")
    );
    for doc in &docs {
        assert_eq!(
            doc["metadata"]["namespace"].as_str().unwrap_or("stitch"),
            "stitch",
            "{:?}",
            doc["metadata"]["name"]
        );
    }
}

#[test]
fn every_overlay_file_is_used_by_its_kustomization() {
    let kustomization = &yaml_file("k8s/overlays/example/kustomization.yaml")[0];
    let mut used: Vec<String> = kustomization["patches"]
        .as_vec()
        .expect("patches")
        .iter()
        .map(|p| yaml_str(&p["path"], "patches[].path").to_owned())
        .collect();
    for generator in kustomization["secretGenerator"]
        .as_vec()
        .into_iter()
        .flatten()
    {
        for file in generator["files"].as_vec().expect("secretGenerator files") {
            let file = yaml_str(file, "files[]");
            used.push(
                file.split_once('=')
                    .map_or(file, |(_, path)| path)
                    .to_owned(),
            );
        }
    }
    used.push("kustomization.yaml".to_owned());
    used.sort();
    let mut present: Vec<String> = std::fs::read_dir(repo_path("k8s/overlays/example"))
        .expect("overlay directory")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    present.sort();
    assert_eq!(used, present);
}

/// Every scalar of a strategic-merge patch with its path, but the patch's identity
/// (apiVersion, kind, metadata.name).
fn patch_leaves<'a>(
    node: &'a Yaml,
    path: &mut Vec<String>,
    out: &mut Vec<(Vec<String>, &'a Yaml)>,
) {
    match node {
        Yaml::Hash(hash) => {
            for (k, v) in hash {
                path.push(yaml_str(k, "patch key").to_owned());
                let identity = matches!(
                    path.iter()
                        .map(String::as_str)
                        .collect::<Vec<_>>()
                        .as_slice(),
                    ["apiVersion" | "kind"] | ["metadata", "name"]
                );
                if !identity {
                    patch_leaves(v, path, out);
                }
                path.pop();
            }
        }
        Yaml::Array(_) => panic!(
            "a list in an overlay patch at {}: extend this check to follow its merge key",
            path.join(".")
        ),
        scalar => out.push((path.clone(), scalar)),
    }
}

fn at_path<'a>(doc: &'a Yaml, path: &[String]) -> &'a Yaml {
    path.iter().fold(doc, |node, key| &node[key.as_str()])
}

/// A JSON pointer (`/spec/rules/0/host`) into a document.
fn at_pointer<'a>(doc: &'a Yaml, pointer: &str) -> &'a Yaml {
    let rest = pointer.strip_prefix('/').expect("a JSON pointer");
    rest.split('/').fold(doc, |node, token| {
        let token = token.replace("~1", "/").replace("~0", "~");
        match node {
            Yaml::Array(items) => items
                .get(token.parse::<usize>().expect("a list index"))
                .unwrap_or(&Yaml::BadValue),
            _ => &node[token.as_str()],
        }
    })
}

#[test]
fn the_rendered_overlay_shows_the_effect_of_each_of_its_patches_and_images() {
    const OVERLAY: &str = "k8s/overlays/example";
    let (_, docs) = render(OVERLAY);
    let (_, base) = render("k8s/base");
    let kustomization = &yaml_file(&format!("{OVERLAY}/kustomization.yaml"))[0];
    for entry in kustomization["patches"].as_vec().expect("patches") {
        let file = yaml_str(&entry["path"], "patches[].path");
        let patches = yaml_file(&format!("{OVERLAY}/{file}"));
        if let [Yaml::Array(ops)] = patches.as_slice() {
            // A JSON 6902 patch: each replaced value is in the rendered target, and was not
            // already in the base.
            let target = &entry["target"];
            let kind = yaml_str(&target["kind"], "target.kind");
            let name = yaml_str(&target["name"], "target.name");
            let rendered = find(&docs, kind, name);
            let original = find(&base, kind, name);
            for op in ops {
                assert_eq!(
                    op["op"].as_str(),
                    Some("replace"),
                    "{file}: extend this check"
                );
                let pointer = yaml_str(&op["path"], "path");
                assert_eq!(
                    at_pointer(rendered, pointer),
                    &op["value"],
                    "{file}: {pointer}"
                );
                assert_ne!(
                    at_pointer(original, pointer),
                    &op["value"],
                    "{file}: {pointer} unchanged"
                );
            }
            continue;
        }
        for patch in &patches {
            let kind = yaml_str(&patch["kind"], "kind");
            let name = yaml_str(&patch["metadata"]["name"], "metadata.name");
            let rendered = find(&docs, kind, name);
            assert_eq!(
                rendered["apiVersion"], patch["apiVersion"],
                "{file}: {kind}/{name}"
            );
            let mut leaves = Vec::new();
            patch_leaves(patch, &mut Vec::new(), &mut leaves);
            assert!(!leaves.is_empty(), "{file}: {kind}/{name} patches nothing");
            for (path, value) in &leaves {
                assert_eq!(
                    at_path(rendered, path),
                    *value,
                    "{file}: {kind}/{name} {}",
                    path.join(".")
                );
            }
            let original = find(&base, kind, name);
            assert!(
                leaves
                    .iter()
                    .any(|(path, value)| at_path(original, path) != *value),
                "{file}: {kind}/{name}: the base already has every value of the patch"
            );
        }
    }
    // The base's namespace is on every resource but the Namespace, which is named after it.
    let base_kustomization = &yaml_file("k8s/base/kustomization.yaml")[0];
    let namespace = yaml_str(&base_kustomization["namespace"], "the base's namespace");
    for doc in &docs {
        let kind = yaml_str(&doc["kind"], "kind");
        if kind == "Namespace" {
            assert_eq!(doc["metadata"]["name"].as_str(), Some(namespace));
            assert!(doc["metadata"]["namespace"].is_badvalue());
        } else {
            assert_eq!(
                doc["metadata"]["namespace"].as_str(),
                Some(namespace),
                "{kind}/{:?}",
                doc["metadata"]["name"]
            );
        }
    }
    // Every container image the overlay's `images` names is rewritten in every container and
    // init container.
    for image in kustomization["images"].as_vec().expect("images") {
        let name = yaml_str(&image["name"], "images[].name");
        let expected = format!(
            "{}:{}",
            yaml_str(&image["newName"], "newName"),
            yaml_str(&image["newTag"], "newTag")
        );
        let before: Vec<(String, &Yaml)> = containers(&base);
        let after: BTreeMap<String, &Yaml> = containers(&docs).into_iter().collect();
        let mut rewritten = 0;
        for (container, original) in before {
            if original["image"].as_str() == Some(name) {
                assert_eq!(
                    after[&container]["image"].as_str(),
                    Some(expected.as_str()),
                    "{container}"
                );
                rewritten += 1;
            }
        }
        assert!(rewritten >= 5, "{name}: {rewritten} containers rewritten");
    }
}

/// The renderer against `kubectl kustomize` (kustomize v5), run by hand where kubectl is
/// installed (fresh machines have none, and the package registries offer no recent one): both
/// renderings of the base and of the example overlay must hold the same documents (a set,
/// keyed by apiVersion, kind, namespace and name), each equal field for field (mapping key
/// order aside; list order counts).
#[test]
#[ignore = "needs kubectl: cargo test -p stitch-deploy-check -- --ignored"]
fn the_renderer_agrees_with_kubectl_kustomize() {
    let kubectl_runs = std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        kubectl_runs,
        "kubectl is not installed: this test compares the renderer with kubectl's kustomize"
    );
    type Key = (String, String, String, String);
    let by_id = |docs: &[Yaml], what: &str| -> BTreeMap<Key, Yaml> {
        let mut map = BTreeMap::new();
        for doc in docs {
            let id = (
                yaml_str(&doc["apiVersion"], "apiVersion").to_owned(),
                yaml_str(&doc["kind"], "kind").to_owned(),
                doc["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                yaml_str(&doc["metadata"]["name"], "metadata.name").to_owned(),
            );
            let previous = map.insert(id.clone(), kustomize::canonical(doc));
            assert!(previous.is_none(), "{what}: {id:?} twice");
        }
        map
    };
    for dir in ["k8s/base", "k8s/overlays/example"] {
        let (_, ours) = render(dir);
        let result = run(std::process::Command::new("kubectl")
            .arg("kustomize")
            .arg(repo_path(dir)));
        assert!(
            result.succeeded(),
            "kubectl kustomize {dir}: {}",
            result.output()
        );
        let theirs = yaml_docs(&result.stdout, &format!("kubectl kustomize {dir}"));
        let ours = by_id(&ours, dir);
        let theirs = by_id(&theirs, &format!("kubectl kustomize {dir}"));
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "{dir}: not the same resources"
        );
        for (id, doc) in &ours {
            if doc != &theirs[id] {
                panic!(
                    "{dir}: {id:?} differs\n--- ours ---\n{}\n--- kubectl ---\n{}",
                    kustomize::to_yaml(std::slice::from_ref(doc)).unwrap_or_default(),
                    kustomize::to_yaml(std::slice::from_ref(&theirs[id])).unwrap_or_default()
                );
            }
        }
        assert!(ours.len() >= 19, "{dir}: {} resources", ours.len());
    }
}

#[test]
fn kubernetes_validate_rejects_a_deployment_with_an_unknown_field_or_a_wrong_type() {
    let original = read("k8s/base/api-deployment.yaml");
    let dir = temp_dir();

    // A misspelt field: fine for a lax check, refused by --strict.
    let typo = original.replacen("  replicas: 3\n", "  replica: 3\n", 1);
    assert_ne!(typo, original, "no `  replicas: 3` to break");
    let file = dir.path().join("typo.yaml");
    std::fs::write(&file, typo).unwrap();
    let lax = run(Validator::KubernetesValidate.command().arg(&file));
    assert!(lax.succeeded(), "without --strict: {}", lax.output());
    let strict = kubernetes_validate(&[file.as_path()], VERSIONS[1]);
    assert!(!strict.succeeded(), "accepted: {}", strict.output());
    assert!(
        format!("{}{}", strict.stdout, strict.stderr).contains("replica"),
        "{}",
        strict.output()
    );

    // A string where an integer belongs.
    let wrong = original.replacen(
        "terminationGracePeriodSeconds: 80",
        "terminationGracePeriodSeconds: eighty",
        1,
    );
    assert_ne!(wrong, original);
    let file = dir.path().join("wrong-type.yaml");
    std::fs::write(&file, wrong).unwrap();
    let strict = kubernetes_validate(&[file.as_path()], VERSIONS[1]);
    assert!(!strict.succeeded(), "accepted: {}", strict.output());
    assert!(
        format!("{}{}", strict.stdout, strict.stderr).contains("eighty"),
        "{}",
        strict.output()
    );
}

/// The value of `key` in a rendered Secret (`stringData`, or `data` base64-decoded), if any.
fn secret_value(secret: &Yaml, key: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    if let Some(text) = secret["stringData"][key].as_str() {
        return Some(text.as_bytes().to_vec());
    }
    let encoded = secret["data"][key].as_str()?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap_or_else(|e| panic!("Secret key {key}: not base64: {e}"));
    Some(decoded)
}

/// The environment a container sees: its envFrom ConfigMaps, then its env (values and
/// Secret references resolved from the rendered Secret).
fn container_env(container: &Yaml, docs: &[Yaml]) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for source in container["envFrom"].as_vec().into_iter().flatten() {
        let name = yaml_str(&source["configMapRef"]["name"], "envFrom configMapRef");
        let map = find(docs, "ConfigMap", name);
        for (k, v) in map["data"].as_hash().expect("ConfigMap data") {
            env.insert(
                yaml_str(k, "data key").to_owned(),
                yaml_str(v, "data value").to_owned(),
            );
        }
    }
    for var in container["env"].as_vec().into_iter().flatten() {
        let name = yaml_str(&var["name"], "env name").to_owned();
        let value = if let Some(value) = var["value"].as_str() {
            value.to_owned()
        } else {
            let key_ref = &var["valueFrom"]["secretKeyRef"];
            let secret = find(
                docs,
                "Secret",
                yaml_str(&key_ref["name"], "secretKeyRef.name"),
            );
            let key = yaml_str(&key_ref["key"], "secretKeyRef.key");
            let value = secret_value(secret, key).unwrap_or_else(|| panic!("no Secret key {key}"));
            String::from_utf8(value).expect("a UTF-8 Secret value")
        };
        env.insert(name, value);
    }
    env
}

/// Every container and init container of the Deployments and Jobs, with its pod spec.
fn pod_containers(docs: &[Yaml]) -> Vec<(String, &Yaml, &Yaml)> {
    let mut all = Vec::new();
    for doc in docs {
        if !matches!(doc["kind"].as_str(), Some("Deployment" | "Job")) {
            continue;
        }
        let owner = yaml_str(&doc["metadata"]["name"], "name");
        let spec = &doc["spec"]["template"]["spec"];
        for list in ["initContainers", "containers"] {
            for c in spec[list].as_vec().into_iter().flatten() {
                all.push((format!("{owner}/{}", yaml_str(&c["name"], "name")), spec, c));
            }
        }
    }
    all
}

/// Every container and init container of the Deployments and Jobs.
fn containers(docs: &[Yaml]) -> Vec<(String, &Yaml)> {
    pod_containers(docs)
        .into_iter()
        .map(|(name, _, c)| (name, c))
        .collect()
}

/// The Secret (name, key) whose file a container finds at `path`, the mount being read-only
/// and not a subPath (which would never see the Secret's updates); panics otherwise.
fn secret_file_at<'a>(pod: &'a Yaml, container: &'a Yaml, path: &str) -> (&'a str, String) {
    let mount = container["volumeMounts"]
        .as_vec()
        .into_iter()
        .flatten()
        .find(|m| {
            let at = yaml_str(&m["mountPath"], "mountPath").trim_end_matches('/');
            path.strip_prefix(at)
                .is_some_and(|rest| rest.starts_with('/'))
        })
        .unwrap_or_else(|| panic!("no volume is mounted where {path} is"));
    assert_eq!(
        mount["readOnly"].as_bool(),
        Some(true),
        "{path}: not read-only"
    );
    assert!(
        mount["subPath"].is_badvalue(),
        "{path}: a subPath mount does not follow the Secret's updates"
    );
    let at = yaml_str(&mount["mountPath"], "mountPath").trim_end_matches('/');
    let volume_name = yaml_str(&mount["name"], "volumeMounts[].name");
    let volume = pod["volumes"]
        .as_vec()
        .into_iter()
        .flatten()
        .find(|v| v["name"].as_str() == Some(volume_name))
        .unwrap_or_else(|| panic!("no volume {volume_name}"));
    let secret = yaml_str(
        &volume["secret"]["secretName"],
        "a Secret volume's secretName",
    );
    (secret, path[at.len() + 1..].to_owned())
}

/// The Secret an overlay supplies: the base mounts it, the example overlay generates it.
const KEYS_SECRET: &str = "stitch-keys";

/// Placeholders filled in as an operator must before deploying (`CHANGE-ME` in the Secret).
fn filled_in(mut env: BTreeMap<String, String>) -> BTreeMap<String, String> {
    for value in env.values_mut() {
        *value = value.replace("CHANGE-ME", "chosen-by-the-operator-0123456789abcdef");
    }
    env
}

#[test]
fn every_container_gets_a_configuration_that_stitch_accepts() {
    let scratch = temp_dir();
    for dir in ["k8s/base", "k8s/overlays/example"] {
        let (_, docs) = render(dir);
        let all = pod_containers(&docs);
        assert!(all.len() >= 5, "{dir}: {} containers", all.len());
        for (i, (name, pod, container)) in all.into_iter().enumerate() {
            let mut env = filled_in(container_env(container, &docs));
            for key in [
                "STITCH__REDIS__URL",
                "STITCH__AMQP__URL",
                "STITCH__NAMESPACE",
            ] {
                assert!(env.contains_key(key), "{dir} {name}: no {key}");
            }
            // The keys file the container would find mounted, for the loader to read.
            if let Some(path) = env.get("STITCH__AUTH__KEYS_FILE").cloned() {
                let (secret, key) = secret_file_at(pod, container, &path);
                let rendered = docs.iter().find(|d| {
                    d["kind"].as_str() == Some("Secret")
                        && d["metadata"]["name"].as_str() == Some(secret)
                });
                match rendered {
                    Some(doc) => {
                        let bytes = secret_value(doc, &key)
                            .unwrap_or_else(|| panic!("{dir} {name}: {secret} has no {key}"));
                        let file = scratch.path().join(format!("{i}-{key}"));
                        std::fs::write(&file, bytes).unwrap();
                        env.insert(
                            "STITCH__AUTH__KEYS_FILE".to_owned(),
                            file.display().to_string(),
                        );
                    }
                    None => {
                        // The overlay's to supply; its file is checked in the overlay.
                        assert_eq!((dir, secret), ("k8s/base", KEYS_SECRET), "{name}");
                        env.remove("STITCH__AUTH__KEYS_FILE");
                    }
                }
            }
            if let Err(e) = check_config(Path::new(CHECKER), &env) {
                panic!("{dir} {name}: not a valid configuration:\n{e}");
            }
        }
    }
}

#[test]
fn api_and_worker_pods_read_the_api_keys_from_a_read_only_secret_mount() {
    for dir in ["k8s/base", "k8s/overlays/example"] {
        let (_, docs) = render(dir);
        for (deployment, container) in [("stitch-api", "api"), ("stitch-worker", "worker")] {
            let pod = &find(&docs, "Deployment", deployment)["spec"]["template"]["spec"];
            let c = pod["containers"]
                .as_vec()
                .expect("containers")
                .iter()
                .find(|c| c["name"].as_str() == Some(container))
                .unwrap_or_else(|| panic!("no container {container}"));
            let path = env_value(c, "STITCH__AUTH__KEYS_FILE");
            assert_eq!(
                secret_file_at(pod, c, path),
                (KEYS_SECRET, "keys.toml".to_owned()),
                "{dir} {deployment}"
            );
        }
        // The token secret comes from a Secret, never a literal.
        let api =
            &find(&docs, "Deployment", "stitch-api")["spec"]["template"]["spec"]["containers"][0];
        let token = api["env"]
            .as_vec()
            .expect("env")
            .iter()
            .find(|v| v["name"].as_str() == Some("STITCH__AUTH__TOKEN_SECRET"))
            .expect("the API has STITCH__AUTH__TOKEN_SECRET");
        assert!(token["value"].is_badvalue(), "a literal token secret");
        assert_eq!(
            token["valueFrom"]["secretKeyRef"]["name"].as_str(),
            Some("stitch-secrets")
        );
    }
    // The example overlay generates the keys Secret from its keys.toml, in the namespace,
    // under a fixed name (a hashed name would change the pods on every key change).
    let (_, docs) = render("k8s/overlays/example");
    let secret = find(&docs, "Secret", KEYS_SECRET);
    assert_eq!(secret["metadata"]["namespace"].as_str(), Some("stitch"));
    assert_eq!(
        secret_value(secret, "keys.toml").expect("keys.toml"),
        read("k8s/overlays/example/keys.toml").into_bytes()
    );
}

#[test]
fn an_api_left_with_the_placeholder_token_secret_refuses_to_start() {
    let (_, docs) = render("k8s/base");
    let api = &find(&docs, "Deployment", "stitch-api")["spec"]["template"]["spec"]["containers"][0];
    let mut env = container_env(api, &docs);
    env.remove("STITCH__AUTH__KEYS_FILE");
    let err = check_config(Path::new(CHECKER), &env).expect_err("the placeholder was accepted");
    assert!(err.contains("STITCH__AUTH__TOKEN_SECRET"), "{err}");
    assert!(err.contains("at least 32 characters"), "{err}");
}

#[test]
fn every_container_runs_unprivileged_on_a_read_only_root() {
    let (_, docs) = render("k8s/base");
    for doc in &docs {
        if !matches!(doc["kind"].as_str(), Some("Deployment" | "Job")) {
            continue;
        }
        let pod = &doc["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
        assert_eq!(pod["securityContext"]["runAsUser"].as_i64(), Some(10001));
    }
    for (name, c) in containers(&docs) {
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "{name}");
        assert_eq!(
            sc["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{name}"
        );
        assert_eq!(
            sc["capabilities"]["drop"][0].as_str(),
            Some("ALL"),
            "{name}"
        );
        assert!(
            c["resources"]["requests"]["memory"].as_str().is_some(),
            "{name} requests no memory"
        );
    }
}

fn command_of(container: &Yaml) -> Vec<&str> {
    container["command"]
        .as_vec()
        .expect("command")
        .iter()
        .map(|a| yaml_str(a, "command[]"))
        .collect()
}

#[test]
fn migrations_run_in_a_job_and_every_server_waits_for_them() {
    let (_, docs) = render("k8s/base");
    let job = find(&docs, "Job", "stitch-migrate");
    let migrate = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(command_of(migrate), ["stitch-worker", "migrate"]);
    for name in ["stitch-api", "stitch-worker"] {
        let deployment = find(&docs, "Deployment", name);
        let init = &deployment["spec"]["template"]["spec"]["initContainers"][0];
        assert_eq!(
            command_of(init),
            ["stitch-worker", "migrate", "--check", "--wait", "600"],
            "{name}"
        );
    }
    let api = &find(&docs, "Deployment", "stitch-api")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(command_of(api), ["stitch-api"]);
    let worker =
        &find(&docs, "Deployment", "stitch-worker")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(command_of(worker), ["stitch-worker"]);
}

fn env_value<'a>(container: &'a Yaml, key: &str) -> &'a str {
    container["env"]
        .as_vec()
        .expect("env")
        .iter()
        .find(|v| v["name"].as_str() == Some(key))
        .and_then(|v| v["value"].as_str())
        .unwrap_or_else(|| panic!("no {key} value"))
}

#[test]
fn grace_periods_cover_each_process_s_drain() {
    let (_, docs) = render("k8s/base");
    // API: the preStop sleep and the drain both count against the grace period.
    let api = &find(&docs, "Deployment", "stitch-api")["spec"]["template"]["spec"];
    let container = &api["containers"][0];
    let pre_stop = command_of(&container["lifecycle"]["preStop"]["exec"]);
    assert_eq!(pre_stop[0], "sleep");
    let sleep: u64 = pre_stop[1].parse().expect("preStop seconds");
    let drain = stitch_seconds(env_value(container, "STITCH__HTTP__SHUTDOWN_GRACE"));
    let grace = api["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("grace") as u64;
    assert!(
        grace >= sleep + drain + 5,
        "API: {grace}s < preStop {sleep}s + drain {drain}s + margin"
    );
    assert!(
        sleep >= 5,
        "API: a preStop of {sleep}s leaves endpoints no time to update"
    );

    // Worker: running merges may finish within the drain; then they are cancelled.
    let worker = &find(&docs, "Deployment", "stitch-worker")["spec"]["template"]["spec"];
    let drain = stitch_seconds(env_value(
        &worker["containers"][0],
        "STITCH__HTTP__SHUTDOWN_GRACE",
    ));
    let grace = worker["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("grace") as u64;
    assert!(
        grace >= drain + 15,
        "worker: {grace}s < drain {drain}s + margin"
    );
}

#[test]
fn probes_ask_the_port_each_process_binds() {
    let (_, docs) = render("k8s/base");
    for (name, port) in [("stitch-api", 8080), ("stitch-worker", 8081)] {
        let c = &find(&docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            env_value(c, "STITCH__HTTP__BIND"),
            format!("0.0.0.0:{port}"),
            "{name}"
        );
        assert_eq!(
            c["ports"][0]["containerPort"].as_i64(),
            Some(port),
            "{name}"
        );
        let port_name = yaml_str(&c["ports"][0]["name"], "port name");
        for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
            assert_eq!(c[probe]["httpGet"]["path"].as_str(), Some(path), "{name}");
            assert_eq!(
                c[probe]["httpGet"]["port"].as_str(),
                Some(port_name),
                "{name}"
            );
        }
    }
}

#[test]
fn the_ingress_admits_the_largest_chunk_and_streams_it() {
    let (_, docs) = render("k8s/base");
    let config = find(&docs, "ConfigMap", "stitch-config");
    let max_chunk = stitch_size(yaml_str(
        &config["data"]["STITCH__LIMITS__MAX_CHUNK_BYTES"],
        "STITCH__LIMITS__MAX_CHUNK_BYTES",
    ));
    assert_eq!(
        api_multipart_overhead(),
        MULTIPART_OVERHEAD,
        "api/src/body.rs changed its multipart allowance"
    );
    let ingress = find(&docs, "Ingress", "stitch-api");
    let annotations = &ingress["metadata"]["annotations"];
    let annotation = |key: &str| {
        yaml_str(
            &annotations[format!("nginx.ingress.kubernetes.io/{key}").as_str()],
            key,
        )
    };
    let body = nginx_size(annotation("proxy-body-size"));
    assert!(
        body >= max_chunk + MULTIPART_OVERHEAD,
        "proxy-body-size {body} < largest chunk {max_chunk} + multipart {MULTIPART_OVERHEAD}"
    );
    assert_eq!(annotation("proxy-request-buffering"), "off");
    let read_timeout: u64 = annotation("proxy-read-timeout").parse().expect("seconds");
    assert!(read_timeout >= 60, "proxy-read-timeout {read_timeout}");
    // Probes and metrics stay inside the cluster.
    for path in ingress["spec"]["rules"][0]["http"]["paths"]
        .as_vec()
        .expect("paths")
    {
        let path = yaml_str(&path["path"], "path");
        assert!(
            ["/upload", "/files"].contains(&path),
            "the ingress exposes {path}"
        );
    }
}

/// `MULTIPART_OVERHEAD` as api/src/body.rs defines it (read, so a change there fails here).
fn api_multipart_overhead() -> u64 {
    let source = read("api/src/body.rs");
    let line = source
        .lines()
        .find(|l| l.contains("const MULTIPART_OVERHEAD: u64 ="))
        .expect("MULTIPART_OVERHEAD in api/src/body.rs");
    let expr = line
        .split('=')
        .nth(1)
        .expect("a value")
        .trim()
        .trim_end_matches(';');
    match expr.split_once("<<") {
        Some((a, b)) => {
            a.trim().parse::<u64>().expect("number") << b.trim().parse::<u32>().expect("shift")
        }
        None => expr.parse().expect("number"),
    }
}

#[test]
fn the_worker_scaler_watches_the_merge_queue_of_the_configured_namespace() {
    let (_, docs) = render("k8s/base");
    let scaled = find(&docs, "ScaledObject", "stitch-worker");
    assert_eq!(scaled["apiVersion"].as_str(), Some("keda.sh/v1alpha1"));
    assert_eq!(
        scaled["spec"]["scaleTargetRef"]["name"].as_str(),
        Some("stitch-worker")
    );
    find(&docs, "Deployment", "stitch-worker");
    let min = scaled["spec"]["minReplicaCount"]
        .as_i64()
        .expect("minReplicaCount");
    let max = scaled["spec"]["maxReplicaCount"]
        .as_i64()
        .expect("maxReplicaCount");
    assert!(
        min >= 1 && max > min,
        "min {min}, max {max}: the sweeper and janitor need a worker"
    );

    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(trigger["type"].as_str(), Some("rabbitmq"));
    let namespace = yaml_str(
        &find(&docs, "ConfigMap", "stitch-config")["data"]["STITCH__NAMESPACE"],
        "STITCH__NAMESPACE",
    );
    assert_eq!(
        trigger["metadata"]["queueName"].as_str(),
        Some(format!("{namespace}.merge").as_str())
    );
    assert_eq!(trigger["metadata"]["mode"].as_str(), Some("QueueLength"));
    // Over http KEDA counts unacknowledged (running) merges too.
    assert_eq!(trigger["metadata"]["protocol"].as_str(), Some("http"));
    let worker =
        &find(&docs, "Deployment", "stitch-worker")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        trigger["metadata"]["value"].as_str(),
        Some(env_value(worker, "STITCH__MERGE__CONCURRENCY")),
        "jobs per worker = its merge slots"
    );

    let auth_name = yaml_str(&trigger["authenticationRef"]["name"], "authenticationRef");
    let auth = find(&docs, "TriggerAuthentication", auth_name);
    assert_eq!(auth["apiVersion"].as_str(), Some("keda.sh/v1alpha1"));
    let target = &auth["spec"]["secretTargetRef"][0];
    assert_eq!(target["parameter"].as_str(), Some("host"));
    let secret = find(&docs, "Secret", yaml_str(&target["name"], "secret name"));
    let host = yaml_str(
        &secret["stringData"][yaml_str(&target["key"], "secret key")],
        "management URL",
    );
    assert!(host.starts_with("http"), "{host}");
}

#[test]
fn the_service_monitor_scrapes_api_and_worker_metrics() {
    let (_, docs) = render("k8s/base");
    let monitor = find(&docs, "ServiceMonitor", "stitch");
    assert_eq!(
        monitor["apiVersion"].as_str(),
        Some("monitoring.coreos.com/v1")
    );
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["path"].as_str(), Some("/metrics"));
    let port = yaml_str(&endpoint["port"], "endpoint port");
    let labels = monitor["spec"]["selector"]["matchLabels"]
        .as_hash()
        .expect("matchLabels");
    let components: Vec<&str> = monitor["spec"]["selector"]["matchExpressions"][0]["values"]
        .as_vec()
        .expect("values")
        .iter()
        .map(|v| yaml_str(v, "value"))
        .collect();
    for name in ["stitch-api", "stitch-worker"] {
        let service = find(&docs, "Service", name);
        let service_labels = service["metadata"]["labels"].as_hash().expect("labels");
        for (k, v) in labels {
            assert_eq!(service_labels.get(k), Some(v), "{name} lacks label {k:?}");
        }
        let component = yaml_str(
            &service["metadata"]["labels"]["app.kubernetes.io/component"],
            "component",
        );
        assert!(components.contains(&component), "{name} not selected");
        assert!(
            service["spec"]["ports"]
                .as_vec()
                .expect("ports")
                .iter()
                .any(|p| p["name"].as_str() == Some(port)),
            "{name} has no port named {port}"
        );
    }
}

#[test]
fn storage_is_one_read_write_many_claim_mounted_at_the_storage_root() {
    let (_, docs) = render("k8s/base");
    let pvc = find(&docs, "PersistentVolumeClaim", "stitch-data");
    assert_eq!(
        pvc["spec"]["accessModes"][0].as_str(),
        Some("ReadWriteMany")
    );
    let root = yaml_str(
        &find(&docs, "ConfigMap", "stitch-config")["data"]["STITCH__STORAGE__ROOT"],
        "STITCH__STORAGE__ROOT",
    );
    for (kind, name) in [
        ("Deployment", "stitch-api"),
        ("Deployment", "stitch-worker"),
    ] {
        let pod = &find(&docs, kind, name)["spec"]["template"]["spec"];
        let volume = pod["volumes"]
            .as_vec()
            .expect("volumes")
            .iter()
            .find(|v| v["persistentVolumeClaim"]["claimName"].as_str() == Some("stitch-data"))
            .unwrap_or_else(|| panic!("{name} does not use the claim"));
        let volume_name = yaml_str(&volume["name"], "volume name");
        let mount = pod["containers"][0]["volumeMounts"]
            .as_vec()
            .expect("volumeMounts")
            .iter()
            .find(|m| m["name"].as_str() == Some(volume_name))
            .unwrap_or_else(|| panic!("{name} does not mount it"));
        assert_eq!(mount["mountPath"].as_str(), Some(root), "{name}");
    }
}

#[test]
fn disruption_budgets_and_network_policies_select_existing_pods() {
    let (_, docs) = render("k8s/base");
    let pod_labels: Vec<&Yaml> = ["stitch-api", "stitch-worker"]
        .iter()
        .map(|n| &find(&docs, "Deployment", n)["spec"]["template"]["metadata"]["labels"])
        .collect();
    let selects_a_pod = |selector: &Yaml| {
        let wanted = selector.as_hash().expect("matchLabels");
        pod_labels.iter().any(|labels| {
            let labels = labels.as_hash().expect("labels");
            wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
        })
    };
    for name in ["stitch-api", "stitch-worker"] {
        let pdb = find(&docs, "PodDisruptionBudget", name);
        assert!(
            selects_a_pod(&pdb["spec"]["selector"]["matchLabels"]),
            "pdb {name}"
        );
        let policy = find(&docs, "NetworkPolicy", name);
        assert!(
            selects_a_pod(&policy["spec"]["podSelector"]["matchLabels"]),
            "policy {name}"
        );
    }
    find(&docs, "NetworkPolicy", "default-deny-ingress");
    let hpa = find(&docs, "HorizontalPodAutoscaler", "stitch-api");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"].as_str(),
        Some("stitch-api")
    );
    let api = find(&docs, "Deployment", "stitch-api");
    assert!(api["spec"]["replicas"].as_i64().expect("replicas") >= 3);
}
