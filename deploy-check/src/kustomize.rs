//! A kustomize renderer for exactly the part of kustomize that `k8s/` uses, so that the tests
//! render the overlays without kubectl (whose kustomize is not installable from the
//! registries the project uses: Debian's `kubernetes-client` is kubectl 1.20, too old for
//! `patches:`).
//!
//! Implemented, with kustomize v5's semantics (the ignored test in `tests/kubernetes.rs`
//! compares the repository's renderings with `kubectl kustomize`; the expectations of the unit
//! tests below were checked once against kubectl 1.32's kustomize v5.5.0):
//!
//! - `resources`: files (every YAML document of the file) inside the kustomization's
//!   directory, and directories holding a kustomization, built recursively;
//! - `patches` with `path` (a file inside the kustomization's directory) and an optional
//!   `target` (`group`, `version`, `kind`, `name`), applied in order. A file of mappings is
//!   strategic-merge patches; without a target each is applied to the one resource of its
//!   apiVersion, kind, name (and namespace), before or after an earlier namespace change. A
//!   file holding one list is a JSON 6902 patch (`op: replace` only) and needs a target;
//! - `namespace`: set on every namespaced resource; a `v1` Namespace is renamed to it;
//! - `images` (`name`, `newName`, `newTag`): every `image` of a `containers` or
//!   `initContainers` list, at any depth;
//! - `secretGenerator` entries with `name`, `files` (`path` or `key=path`, inside the
//!   kustomization's directory), an optional `type` and `options: {disableNameSuffixHash:
//!   true}`: a Secret whose `data` holds each file base64-encoded, added after the resources
//!   (so patches, the namespace and images apply to it too). The name's hash suffix, and so
//!   the rewriting of references to the Secret, is not implemented: without
//!   `disableNameSuffixHash: true` the entry is refused. (Written from kustomize's
//!   documentation; unlike the rest, its unit tests' expectations were not checked against
//!   kubectl here: the ignored comparison test covers the repository's overlay.)
//!
//! Strategic merge: maps merge recursively, `null` deletes a key, scalars replace; lists merge
//! only where the Kubernetes schema says how, for the pod spec of Pods, PodTemplates,
//! ReplicationControllers, Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs and
//! CronJobs: containers, initContainers, ephemeralContainers, volumes and imagePullSecrets by
//! `name`; a container's `env` by `name`, `ports` by `containerPort`, `volumeMounts` by
//! `mountPath`, `volumeDevices` by `devicePath`; its `command`, `args` and `envFrom` are
//! replaced. Merged elements come first in the patch's order, then the target's other elements
//! (as kustomize orders them).
//!
//! Everything else fails with an error naming it: another kustomization field, another field
//! of a patch, target or image entry, any other list in a strategic-merge patch, `$patch` and
//! the other `$` directives, other JSON patch operations, remote resources, files outside the
//! kustomization's directory, `kind: List`, the namespace special cases (role binding
//! subjects, webhook configurations, APIServices, CRDs). Stricter than kustomize: a patch
//! target or an `images` entry that matches nothing is an error (kustomize silently does
//! nothing), and so is a JSON patch replacing a missing key (kustomize adds it). Extend this
//! file, with kustomize's documented semantics, when a kustomization needs more.

use std::path::{Path, PathBuf};

use yaml_rust2::yaml::Hash;
use yaml_rust2::{Yaml, YamlEmitter, YamlLoader};

/// Renders the kustomization in `dir`, like `kustomize build DIR`: its resources in the order
/// they were listed.
pub fn build(dir: &Path) -> Result<Vec<Yaml>, String> {
    let mut stack = Vec::new();
    Ok(build_dir(dir, &mut stack)?
        .into_iter()
        .map(|r| r.doc)
        .collect())
}

/// The documents as one YAML stream, checked to parse back to exactly `docs`.
pub fn to_yaml(docs: &[Yaml]) -> Result<String, String> {
    let mut text = String::new();
    for doc in docs {
        let mut one = String::new();
        YamlEmitter::new(&mut one)
            .dump(doc)
            .map_err(|e| format!("emitting YAML: {e}"))?;
        text.push_str(&one);
        text.push('\n');
    }
    let back = YamlLoader::load_from_str(&text).map_err(|e| format!("emitted YAML: {e}"))?;
    if back != docs {
        return Err(format!(
            "the emitted YAML does not parse back to the rendered documents:\n{text}"
        ));
    }
    Ok(text)
}

/// `node` with the keys of every mapping sorted, for comparisons that ignore key order.
pub fn canonical(node: &Yaml) -> Yaml {
    match node {
        Yaml::Hash(hash) => {
            let mut entries: Vec<(Yaml, Yaml)> = hash
                .iter()
                .map(|(k, v)| (canonical(k), canonical(v)))
                .collect();
            entries.sort();
            Yaml::Hash(entries.into_iter().collect())
        }
        Yaml::Array(items) => Yaml::Array(items.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// The kustomization fields this renderer implements.
const FIELDS: [&str; 7] = [
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "images",
    "patches",
    "secretGenerator",
];
const SECRET_GENERATOR_FIELDS: [&str; 4] = ["name", "files", "type", "options"];
const GENERATOR_OPTIONS: [&str; 1] = ["disableNameSuffixHash"];
const PATCH_FIELDS: [&str; 2] = ["path", "target"];
const TARGET_FIELDS: [&str; 4] = ["group", "version", "kind", "name"];
const IMAGE_FIELDS: [&str; 3] = ["name", "newName", "newTag"];
const KUSTOMIZATION_FILES: [&str; 3] = ["kustomization.yaml", "kustomization.yml", "Kustomization"];

/// Kinds kustomize treats as cluster-scoped (no `metadata.namespace`).
const CLUSTER_SCOPED: [&str; 23] = [
    "APIService",
    "CSIDriver",
    "CSINode",
    "CertificateSigningRequest",
    "ClusterRole",
    "ClusterRoleBinding",
    "ComponentStatus",
    "CustomResourceDefinition",
    "IngressClass",
    "MutatingWebhookConfiguration",
    "Namespace",
    "Node",
    "PersistentVolume",
    "PodSecurityPolicy",
    "PriorityClass",
    "RuntimeClass",
    "SelfSubjectAccessReview",
    "SelfSubjectRulesReview",
    "StorageClass",
    "SubjectAccessReview",
    "TokenReview",
    "ValidatingWebhookConfiguration",
    "VolumeAttachment",
];

/// Kinds whose namespace kustomize also writes elsewhere than `metadata.namespace`.
const NAMESPACE_SPECIAL: [&str; 6] = [
    "RoleBinding",
    "ClusterRoleBinding",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
    "APIService",
    "CustomResourceDefinition",
];

/// A resource's identity, as kustomize compares them (the namespace `default` is no
/// namespace).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Id {
    group: String,
    version: String,
    kind: String,
    namespace: String,
    name: String,
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let api = if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        };
        let ns = if self.namespace.is_empty() {
            "(no namespace)"
        } else {
            &self.namespace
        };
        write!(f, "{api} {}/{} in {ns}", self.kind, self.name)
    }
}

fn split_api_version(api: &str) -> (String, String) {
    match api.split_once('/') {
        Some((group, version)) => (group.to_owned(), version.to_owned()),
        None => (String::new(), api.to_owned()),
    }
}

/// The identity of a resource or of a patch.
fn id_of(doc: &Yaml, what: &str) -> Result<Id, String> {
    let field = |node: &Yaml, name: &str| {
        node.as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{what}: no {name} (a string) in {doc:?}"))
    };
    let (group, version) = split_api_version(&field(&doc["apiVersion"], "apiVersion")?);
    let namespace = match &doc["metadata"]["namespace"] {
        Yaml::BadValue | Yaml::Null => String::new(),
        ns => field(ns, "metadata.namespace")?,
    };
    Ok(Id {
        group,
        version,
        kind: field(&doc["kind"], "kind")?,
        namespace: if namespace == "default" {
            String::new()
        } else {
            namespace
        },
        name: field(&doc["metadata"]["name"], "metadata.name")?,
    })
}

/// A resource being rendered, with the identities it had before a namespace change (patches
/// written against the base still find it by them, as in kustomize).
struct Resource {
    doc: Yaml,
    previous: Vec<Id>,
}

impl Resource {
    fn id(&self) -> Id {
        id_of(&self.doc, "resource").expect("checked when the resource was loaded")
    }

    fn had_id(&self, id: &Id) -> bool {
        self.id() == *id || self.previous.contains(id)
    }
}

fn key(name: &str) -> Yaml {
    Yaml::String(name.to_owned())
}

/// A mapping's keys, each required to be one of `known`.
fn check_fields(node: &Yaml, known: &[&str], what: &str) -> Result<(), String> {
    let hash = node
        .as_hash()
        .ok_or_else(|| format!("{what}: expected a mapping, found {node:?}"))?;
    for k in hash.keys() {
        let name = k
            .as_str()
            .ok_or_else(|| format!("{what}: a key that is not a string: {k:?}"))?;
        if !known.contains(&name) {
            return Err(format!(
                "{what}: field `{name}` is not implemented by deploy-check's kustomize renderer \
                 (it implements {}; see deploy-check/src/kustomize.rs)",
                known.join(", ")
            ));
        }
    }
    Ok(())
}

/// An optional string field.
fn opt_str(node: &Yaml, field: &str, what: &str) -> Result<Option<String>, String> {
    match &node[field] {
        Yaml::BadValue | Yaml::Null => Ok(None),
        Yaml::String(s) => Ok(Some(s.clone())),
        other => Err(format!("{what}: {field} must be a string, found {other:?}")),
    }
}

/// An optional list field.
fn opt_list<'a>(node: &'a Yaml, field: &str, what: &str) -> Result<&'a [Yaml], String> {
    match &node[field] {
        Yaml::BadValue | Yaml::Null => Ok(&[]),
        Yaml::Array(items) => Ok(items),
        other => Err(format!("{what}: {field} must be a list, found {other:?}")),
    }
}

/// Every non-empty YAML document of a file.
fn load_docs(path: &Path) -> Result<Vec<Yaml>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let docs = YamlLoader::load_from_str(&text)
        .map_err(|e| format!("{} is not valid YAML: {e}", path.display()))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// A file named by a kustomization, which must lie inside its directory (kustomize's default
/// load restriction).
fn file_in_root(root: &Path, relative: &str, what: &str) -> Result<PathBuf, String> {
    let path = root
        .join(relative)
        .canonicalize()
        .map_err(|e| format!("{what}: {relative}: {e}"))?;
    if !path.starts_with(root) {
        return Err(format!(
            "{what}: {relative} is outside {} (kustomize refuses files outside the \
             kustomization's directory)",
            root.display()
        ));
    }
    Ok(path)
}

fn build_dir(dir: &Path, stack: &mut Vec<PathBuf>) -> Result<Vec<Resource>, String> {
    let root = dir
        .canonicalize()
        .map_err(|e| format!("kustomization directory {}: {e}", dir.display()))?;
    if stack.contains(&root) {
        return Err(format!("{} includes itself", root.display()));
    }
    let found: Vec<PathBuf> = KUSTOMIZATION_FILES
        .iter()
        .map(|name| root.join(name))
        .filter(|p| p.is_file())
        .collect();
    let file = match found.as_slice() {
        [one] => one.clone(),
        [] => {
            return Err(format!(
                "{}: no kustomization file ({KUSTOMIZATION_FILES:?})",
                root.display()
            ));
        }
        _ => return Err(format!("{}: several kustomization files", root.display())),
    };
    let what = file.display().to_string();
    let kustomization = match load_docs(&file)?.as_slice() {
        [one] => one.clone(),
        other => return Err(format!("{what}: {} documents, expected one", other.len())),
    };
    check_fields(&kustomization, &FIELDS, &what)?;
    if let Some(api) = opt_str(&kustomization, "apiVersion", &what)?
        && api != "kustomize.config.k8s.io/v1beta1"
    {
        return Err(format!("{what}: apiVersion {api} is not implemented"));
    }
    if let Some(kind) = opt_str(&kustomization, "kind", &what)?
        && kind != "Kustomization"
    {
        return Err(format!("{what}: kind {kind} is not implemented"));
    }

    stack.push(root.clone());
    let mut resources: Vec<Resource> = Vec::new();
    for entry in opt_list(&kustomization, "resources", &what)? {
        let entry = entry
            .as_str()
            .ok_or_else(|| format!("{what}: resources: {entry:?} is not a path"))?;
        let loaded = load_resource(&root, entry, stack, &what)?;
        for resource in loaded {
            let id = resource.id();
            if resources.iter().any(|r| r.id() == id) {
                return Err(format!(
                    "{what}: {entry}: may not add resource with an already registered id: {id}"
                ));
            }
            resources.push(resource);
        }
    }
    stack.pop();

    for (i, entry) in opt_list(&kustomization, "secretGenerator", &what)?
        .iter()
        .enumerate()
    {
        let what = format!("{what}: secretGenerator[{i}]");
        let doc = generate_secret(&root, entry, &what)?;
        let resource = Resource {
            doc,
            previous: Vec::new(),
        };
        let id = resource.id();
        if resources.iter().any(|r| r.id() == id) {
            return Err(format!(
                "{what}: may not add resource with an already registered id: {id}"
            ));
        }
        resources.push(resource);
    }

    // kustomize's order: generators (above), patches, then the namespace, then images.
    for (i, patch) in opt_list(&kustomization, "patches", &what)?
        .iter()
        .enumerate()
    {
        apply_patch_entry(
            &root,
            patch,
            &mut resources,
            &format!("{what}: patches[{i}]"),
        )?;
    }
    if let Some(namespace) = opt_str(&kustomization, "namespace", &what)? {
        set_namespace(&mut resources, &namespace, &what)?;
    }
    for (i, image) in opt_list(&kustomization, "images", &what)?
        .iter()
        .enumerate()
    {
        set_image(&mut resources, image, &format!("{what}: images[{i}]"))?;
    }
    Ok(resources)
}

fn load_resource(
    root: &Path,
    entry: &str,
    stack: &mut Vec<PathBuf>,
    what: &str,
) -> Result<Vec<Resource>, String> {
    let what = format!("{what}: resources: {entry}");
    if entry.contains("://") || entry.starts_with("git@") || entry.starts_with("github.com/") {
        return Err(format!("{what}: remote resources are not implemented"));
    }
    let path = root.join(entry);
    if path.is_dir() {
        return build_dir(&path, stack);
    }
    let path = file_in_root(root, entry, &what)?;
    let mut resources = Vec::new();
    for doc in load_docs(&path)? {
        if !doc.is_hash() {
            return Err(format!("{what}: a document is not a mapping: {doc:?}"));
        }
        let id = id_of(&doc, &what)?;
        if id.kind.ends_with("List") && !doc["items"].is_badvalue() {
            return Err(format!(
                "{what}: kind {} (a list of resources) is not implemented",
                id.kind
            ));
        }
        resources.push(Resource {
            doc,
            previous: Vec::new(),
        });
    }
    Ok(resources)
}

/// A `patches` entry's target.
struct Target {
    group: Option<String>,
    version: Option<String>,
    kind: Option<String>,
    name: Option<String>,
}

impl Target {
    fn parse(node: &Yaml, what: &str) -> Result<Target, String> {
        let what = format!("{what}: target");
        check_fields(node, &TARGET_FIELDS, &what)?;
        let target = Target {
            group: opt_str(node, "group", &what)?,
            version: opt_str(node, "version", &what)?,
            kind: opt_str(node, "kind", &what)?,
            name: opt_str(node, "name", &what)?,
        };
        if let Some(name) = &target.name {
            // kustomize reads target.name as an anchored regular expression: literal names
            // (where `.` matches any character) are the part implemented here.
            if let Some(c) = name
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
            {
                return Err(format!(
                    "{what}: name {name:?}: the regular expression character {c:?} is not \
                     implemented"
                ));
            }
        }
        Ok(target)
    }

    /// Whether the target selects the resource: by its current group, version and kind, and
    /// by its original or current name (as kustomize selects).
    fn selects(&self, resource: &Resource) -> bool {
        let id = resource.id();
        let original = resource.previous.first().unwrap_or(&id);
        // An empty selector field matches anything.
        let field = |want: &Option<String>, have: &str| {
            want.as_ref().is_none_or(|w| w.is_empty() || w == have)
        };
        field(&self.group, &id.group)
            && field(&self.version, &id.version)
            && field(&self.kind, &id.kind)
            && self
                .name
                .as_ref()
                .is_none_or(|n| name_matches(n, &id.name) || name_matches(n, &original.name))
    }
}

/// `pattern` as an anchored regular expression of literal characters and `.`.
fn name_matches(pattern: &str, name: &str) -> bool {
    pattern.chars().count() == name.chars().count()
        && pattern
            .chars()
            .zip(name.chars())
            .all(|(p, c)| p == '.' || p == c)
}

fn apply_patch_entry(
    root: &Path,
    entry: &Yaml,
    resources: &mut [Resource],
    what: &str,
) -> Result<(), String> {
    check_fields(entry, &PATCH_FIELDS, what)?;
    let path = opt_str(entry, "path", what)?.ok_or_else(|| format!("{what}: no path"))?;
    let what = format!("{what} ({path})");
    let target = match &entry["target"] {
        Yaml::BadValue | Yaml::Null => None,
        node => Some(Target::parse(node, &what)?),
    };
    let file = file_in_root(root, &path, &what)?;
    let docs = load_docs(&file)?;
    if let [Yaml::Array(ops)] = docs.as_slice() {
        let target = target.ok_or_else(|| format!("{what}: a JSON 6902 patch needs a target"))?;
        let selected = select(resources, &target, &what)?;
        for i in selected {
            json_patch(&mut resources[i].doc, ops, &what)?;
        }
        return Ok(());
    }
    if docs.is_empty() {
        return Err(format!("{what}: an empty patch"));
    }
    for patch in &docs {
        if !patch.is_hash() {
            return Err(format!(
                "{what}: neither strategic-merge patches (mappings) nor one JSON 6902 patch (a \
                 list)"
            ));
        }
        match &target {
            None => {
                let id = id_of(patch, &what)?;
                let matches: Vec<usize> = (0..resources.len())
                    .filter(|&i| resources[i].had_id(&id))
                    .collect();
                match matches.as_slice() {
                    [i] => strategic_merge_resource(&mut resources[*i].doc, patch, &what)?,
                    [] => return Err(format!("{what}: no resource matches the patch of {id}")),
                    _ => return Err(format!("{what}: several resources match the patch of {id}")),
                }
            }
            Some(target) => {
                for i in select(resources, target, &what)? {
                    strategic_merge_resource(&mut resources[i].doc, patch, &what)?;
                }
            }
        }
    }
    Ok(())
}

/// The resources a target selects; at least one.
fn select(resources: &[Resource], target: &Target, what: &str) -> Result<Vec<usize>, String> {
    let selected: Vec<usize> = (0..resources.len())
        .filter(|&i| target.selects(&resources[i]))
        .collect();
    if selected.is_empty() {
        return Err(format!(
            "{what}: the target matches no resource (kustomize would silently apply nothing)"
        ));
    }
    Ok(selected)
}

/// Applies one strategic-merge patch to a resource, keeping its kind, name and namespace (as
/// kustomize does; a targeted patch may name another resource).
fn strategic_merge_resource(doc: &mut Yaml, patch: &Yaml, what: &str) -> Result<(), String> {
    let kind = doc["kind"].clone();
    let api_version = doc["apiVersion"].clone();
    let name = doc["metadata"]["name"].clone();
    let namespace = doc["metadata"]["namespace"].clone();
    let mut patch = patch.clone();
    if let Yaml::Hash(p) = &mut patch {
        p.remove(&key("kind"));
        p.remove(&key("apiVersion"));
        if let Some(Yaml::Hash(meta)) = p.get_mut(&key("metadata")) {
            meta.remove(&key("name"));
            meta.remove(&key("namespace"));
        }
    }
    let kind_name = kind.as_str().unwrap_or_default().to_owned();
    let api = api_version.as_str().unwrap_or_default().to_owned();
    let mut path = Vec::new();
    merge_into(
        doc,
        &patch,
        &Context {
            kind: &kind_name,
            api: &api,
        },
        &mut path,
        what,
    )?;
    if let Yaml::Hash(d) = doc {
        d.insert(key("kind"), kind);
        d.insert(key("apiVersion"), api_version);
        if let Some(Yaml::Hash(meta)) = d.get_mut(&key("metadata")) {
            meta.insert(key("name"), name);
            if namespace.is_badvalue() {
                meta.remove(&key("namespace"));
            } else {
                meta.insert(key("namespace"), namespace);
            }
        }
    }
    Ok(())
}

struct Context<'a> {
    kind: &'a str,
    api: &'a str,
}

/// How a list of the patched resource merges.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ListMerge {
    ByKey(&'static str),
    Replace,
}

/// The lists whose merge strategy (Kubernetes' `patchStrategy`/`patchMergeKey`) is
/// implemented; `path` is the keys from the resource's root.
fn list_merge(context: &Context, path: &[String]) -> Option<ListMerge> {
    let prefix: &[&str] = match (context.api, context.kind) {
        ("v1", "Pod") => &["spec"],
        ("v1", "PodTemplate") => &["template", "spec"],
        ("v1", "ReplicationController")
        | ("apps/v1", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet")
        | ("batch/v1", "Job") => &["spec", "template", "spec"],
        ("batch/v1", "CronJob") => &["spec", "jobTemplate", "spec", "template", "spec"],
        _ => return None,
    };
    if path.len() < prefix.len() || path.iter().zip(prefix).any(|(a, b)| a != b) {
        return None;
    }
    let rest: Vec<&str> = path[prefix.len()..].iter().map(String::as_str).collect();
    let containers = |c: &str| matches!(c, "containers" | "initContainers" | "ephemeralContainers");
    match rest.as_slice() {
        [c] if containers(c) => Some(ListMerge::ByKey("name")),
        ["volumes" | "imagePullSecrets"] => Some(ListMerge::ByKey("name")),
        [c, "env"] if containers(c) => Some(ListMerge::ByKey("name")),
        [c, "ports"] if containers(c) => Some(ListMerge::ByKey("containerPort")),
        [c, "volumeMounts"] if containers(c) => Some(ListMerge::ByKey("mountPath")),
        [c, "volumeDevices"] if containers(c) => Some(ListMerge::ByKey("devicePath")),
        [c, "command" | "args" | "envFrom"] if containers(c) => Some(ListMerge::Replace),
        _ => None,
    }
}

/// Merges `patch` into `dest` (a mapping); `path` is where they are in the resource.
fn merge_into(
    dest: &mut Yaml,
    patch: &Yaml,
    context: &Context,
    path: &mut Vec<String>,
    what: &str,
) -> Result<(), String> {
    let Yaml::Hash(patch) = patch else {
        *dest = patch.clone();
        return Ok(());
    };
    if !dest.is_hash() {
        *dest = Yaml::Hash(Hash::new());
    }
    let Yaml::Hash(dest) = dest else {
        unreachable!("made a mapping above")
    };
    for (k, value) in patch {
        let name = k
            .as_str()
            .ok_or_else(|| format!("{what}: a key that is not a string: {k:?}"))?;
        path.push(name.to_owned());
        let at = path.join(".");
        if name.starts_with('$') {
            return Err(format!(
                "{what}: the directive {name} (at {at}) is not implemented"
            ));
        }
        match value {
            Yaml::Null => {
                dest.remove(k);
            }
            Yaml::Hash(_) => {
                let slot = dest.entry(k.clone()).or_insert(Yaml::Null);
                merge_into(slot, value, context, path, what)?;
            }
            Yaml::Array(items) => {
                let strategy = list_merge(context, path).ok_or_else(|| {
                    format!(
                        "{what}: how the list {at} of a {} merges is not implemented (use a JSON \
                         6902 patch, or extend list_merge in deploy-check/src/kustomize.rs)",
                        context.kind
                    )
                })?;
                let merged = match (strategy, dest.get(k)) {
                    (ListMerge::ByKey(merge_key), Some(Yaml::Array(existing))) => {
                        merge_list(existing, items, merge_key, context, path, what)?
                    }
                    (ListMerge::ByKey(merge_key), _) => {
                        merge_list(&[], items, merge_key, context, path, what)?
                    }
                    (ListMerge::Replace, _) => value.clone(),
                };
                dest.insert(k.clone(), merged);
            }
            Yaml::Alias(_) | Yaml::BadValue => {
                return Err(format!("{what}: unsupported YAML at {at}: {value:?}"));
            }
            scalar => {
                dest.insert(k.clone(), scalar.clone());
            }
        }
        path.pop();
    }
    Ok(())
}

/// An associative list merged by `merge_key`: the patch's elements first (each merged into
/// the target's element of the same key, if any), then the target's other elements.
fn merge_list(
    existing: &[Yaml],
    patch: &[Yaml],
    merge_key: &str,
    context: &Context,
    path: &mut Vec<String>,
    what: &str,
) -> Result<Yaml, String> {
    let key_of = |element: &Yaml| match &element[merge_key] {
        Yaml::BadValue | Yaml::Null => None,
        k => Some(k.clone()),
    };
    let mut merged = Vec::new();
    let mut used = Vec::new();
    for element in patch {
        let k = key_of(element).ok_or_else(|| {
            format!(
                "{what}: an element of {} has no {merge_key}: {element:?}",
                path.join(".")
            )
        })?;
        let mut result = match existing.iter().position(|e| key_of(e).as_ref() == Some(&k)) {
            Some(i) => {
                used.push(i);
                existing[i].clone()
            }
            None => Yaml::Hash(Hash::new()),
        };
        merge_into(&mut result, element, context, path, what)?;
        merged.push(result);
    }
    merged.extend(
        existing
            .iter()
            .enumerate()
            .filter(|(i, _)| !used.contains(i))
            .map(|(_, e)| e.clone()),
    );
    Ok(Yaml::Array(merged))
}

/// A JSON 6902 patch (`replace` only).
fn json_patch(doc: &mut Yaml, ops: &[Yaml], what: &str) -> Result<(), String> {
    for (i, op) in ops.iter().enumerate() {
        let what = format!("{what}: operation {i}");
        check_fields(op, &["op", "path", "value"], &what)?;
        let name = opt_str(op, "op", &what)?.ok_or_else(|| format!("{what}: no op"))?;
        if name != "replace" {
            return Err(format!(
                "{what}: op {name} is not implemented (only replace)"
            ));
        }
        let pointer = opt_str(op, "path", &what)?.ok_or_else(|| format!("{what}: no path"))?;
        let value = match &op["value"] {
            Yaml::BadValue => return Err(format!("{what}: replace needs a value")),
            v => v.clone(),
        };
        let tokens = pointer_tokens(&pointer, &what)?;
        let identity = match tokens
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice()
        {
            ["kind" | "apiVersion" | "metadata", ..] if tokens.len() == 1 => true,
            ["kind" | "apiVersion", ..] => true,
            ["metadata", "name" | "namespace", ..] => true,
            _ => false,
        };
        if identity {
            return Err(format!(
                "{what}: replacing {pointer} (part of a resource's identity) is not implemented"
            ));
        }
        let mut node = &mut *doc;
        for token in &tokens {
            node = match node {
                Yaml::Hash(hash) => hash.get_mut(&key(token)),
                Yaml::Array(items) => token
                    .parse::<usize>()
                    .ok()
                    .filter(|_| token == "0" || !token.starts_with('0'))
                    .and_then(|i| items.get_mut(i)),
                _ => None,
            }
            .ok_or_else(|| {
                format!(
                    "{what}: {pointer} does not exist (RFC 6902's replace needs it to; kustomize \
                     would add a missing key, this renderer refuses)"
                )
            })?;
        }
        *node = value;
    }
    Ok(())
}

/// The reference tokens of a JSON pointer (RFC 6901).
fn pointer_tokens(pointer: &str, what: &str) -> Result<Vec<String>, String> {
    let rest = pointer
        .strip_prefix('/')
        .ok_or_else(|| format!("{what}: the path {pointer:?} does not start with /"))?;
    Ok(rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn set_namespace(resources: &mut [Resource], namespace: &str, what: &str) -> Result<(), String> {
    for i in 0..resources.len() {
        let id = resources[i].id();
        if NAMESPACE_SPECIAL.contains(&id.kind.as_str()) {
            return Err(format!(
                "{what}: namespace: how kustomize sets the namespace of a {} is not implemented",
                id.kind
            ));
        }
        let resource = &mut resources[i];
        resource.previous.push(id.clone());
        let Some(Yaml::Hash(meta)) = resource
            .doc
            .as_mut_hash()
            .and_then(|d| d.get_mut(&key("metadata")))
        else {
            return Err(format!("{what}: {id}: metadata is not a mapping"));
        };
        if CLUSTER_SCOPED.contains(&id.kind.as_str()) {
            if id.kind == "Namespace" && id.group.is_empty() && id.version == "v1" {
                meta.insert(key("name"), key(namespace));
            }
        } else {
            meta.insert(key("namespace"), key(namespace));
        }
        let now = resources[i].id();
        if resources
            .iter()
            .enumerate()
            .any(|(j, r)| j != i && r.id() == now)
        {
            return Err(format!(
                "{what}: namespace: the namespace change makes two resources {now}"
            ));
        }
    }
    Ok(())
}

/// The Secret a `secretGenerator` entry makes.
fn generate_secret(root: &Path, entry: &Yaml, what: &str) -> Result<Yaml, String> {
    use base64::Engine as _;
    check_fields(entry, &SECRET_GENERATOR_FIELDS, what)?;
    let name = opt_str(entry, "name", what)?.ok_or_else(|| format!("{what}: no name"))?;
    let options = &entry["options"];
    let hash_disabled = match options {
        Yaml::BadValue | Yaml::Null => false,
        _ => {
            check_fields(options, &GENERATOR_OPTIONS, &format!("{what}: options"))?;
            options["disableNameSuffixHash"].as_bool() == Some(true)
        }
    };
    if !hash_disabled {
        return Err(format!(
            "{what}: the name hash suffix (and the rewriting of references to it) is not \
             implemented: set options.disableNameSuffixHash: true"
        ));
    }
    let files = opt_list(entry, "files", what)?;
    if files.is_empty() {
        return Err(format!(
            "{what}: no files (literals and envs are not implemented)"
        ));
    }
    let mut data = Hash::new();
    for file in files {
        let file = file
            .as_str()
            .ok_or_else(|| format!("{what}: files: {file:?} is not a string"))?;
        let (data_key, relative) = match file.split_once('=') {
            Some((k, path)) => (k.to_owned(), path),
            None => (
                Path::new(file)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                file,
            ),
        };
        let valid_key = !data_key.is_empty()
            && data_key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid_key {
            return Err(format!(
                "{what}: files: {data_key:?} is not a valid Secret key"
            ));
        }
        let path = file_in_root(root, relative, what)?;
        let bytes =
            std::fs::read(&path).map_err(|e| format!("{what}: reading {}: {e}", path.display()))?;
        if data
            .insert(
                key(&data_key),
                key(&base64::engine::general_purpose::STANDARD.encode(bytes)),
            )
            .is_some()
        {
            return Err(format!(
                "{what}: files: the key {data_key:?} is given twice"
            ));
        }
    }
    let mut metadata = Hash::new();
    metadata.insert(key("name"), key(&name));
    let mut secret = Hash::new();
    secret.insert(key("apiVersion"), key("v1"));
    secret.insert(key("kind"), key("Secret"));
    secret.insert(key("metadata"), Yaml::Hash(metadata));
    secret.insert(
        key("type"),
        key(&opt_str(entry, "type", what)?.unwrap_or_else(|| "Opaque".to_owned())),
    );
    secret.insert(key("data"), Yaml::Hash(data));
    Ok(Yaml::Hash(secret))
}

/// An `images` entry.
struct Image {
    name: String,
    new_name: Option<String>,
    new_tag: Option<String>,
}

impl Image {
    /// The new reference for `image`, when this entry matches it (kustomize: the name, then an
    /// optional `:tag`, then an optional `@sha256:digest`).
    fn rewrite(&self, image: &str) -> Option<String> {
        let n = self.name.chars().count();
        let head: String = image.chars().take(n).collect();
        if !name_matches(&self.name, &head) {
            return None;
        }
        let rest = &image[head.len()..];
        let tag_chars = |s: &str| {
            s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '{' | '}' | '-'))
        };
        let (tag, digest) = match rest.split_once('@') {
            Some((tag, digest)) => (tag, Some(digest)),
            None => (rest, None),
        };
        let tag = if tag.is_empty() {
            None
        } else {
            Some(tag.strip_prefix(':').filter(|t| tag_chars(t))?)
        };
        if let Some(digest) = digest
            && !digest.strip_prefix("sha256:").is_some_and(tag_chars)
        {
            return None;
        }
        let mut result = self.new_name.clone().unwrap_or(head);
        match (&self.new_tag, tag) {
            (Some(new), _) => {
                result = format!("{result}:{new}");
                return Some(result);
            }
            (None, Some(tag)) => result = format!("{result}:{tag}"),
            (None, None) => {}
        }
        if let Some(digest) = digest {
            result = format!("{result}@{digest}");
        }
        Some(result)
    }
}

fn set_image(resources: &mut [Resource], entry: &Yaml, what: &str) -> Result<(), String> {
    check_fields(entry, &IMAGE_FIELDS, what)?;
    let image = Image {
        name: opt_str(entry, "name", what)?.ok_or_else(|| format!("{what}: no name"))?,
        new_name: opt_str(entry, "newName", what)?,
        new_tag: opt_str(entry, "newTag", what)?,
    };
    if image.new_name.is_none() && image.new_tag.is_none() {
        return Err(format!("{what}: neither newName nor newTag"));
    }
    if let Some(c) = image.name.chars().find(|c| "\\^$*+?()[]{}|".contains(*c)) {
        return Err(format!(
            "{what}: name {:?}: the regular expression character {c:?} is not implemented",
            image.name
        ));
    }
    let mut count = 0;
    for resource in resources.iter_mut() {
        if resource.doc["kind"].as_str() != Some("CustomResourceDefinition") {
            rewrite_images(&mut resource.doc, &image, &mut count);
        }
    }
    if count == 0 {
        return Err(format!(
            "{what}: no container image matches {} (kustomize would silently change nothing)",
            image.name
        ));
    }
    Ok(())
}

/// Rewrites the `image` of every element of every `containers` and `initContainers` list
/// under `node`.
fn rewrite_images(node: &mut Yaml, image: &Image, count: &mut usize) {
    match node {
        Yaml::Hash(hash) => {
            for (k, value) in hash.iter_mut() {
                if matches!(k.as_str(), Some("containers" | "initContainers")) {
                    for container in value.as_mut_vec().into_iter().flatten() {
                        if let Some(Yaml::String(current)) = container
                            .as_mut_hash()
                            .and_then(|c| c.get_mut(&key("image")))
                            && let Some(new) = image.rewrite(current)
                        {
                            *current = new;
                            *count += 1;
                        }
                    }
                }
                rewrite_images(value, image, count);
            }
        }
        Yaml::Array(items) => {
            for item in items {
                rewrite_images(item, image, count);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kustomization tree in a temporary directory: (relative path, content) pairs.
    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = crate::temp_dir();
        for (path, content) in files {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        dir
    }

    fn render(dir: &tempfile::TempDir, sub: &str) -> Result<Vec<Yaml>, String> {
        build(&dir.path().join(sub))
    }

    fn yaml(text: &str) -> Yaml {
        YamlLoader::load_from_str(text).unwrap().remove(0)
    }

    fn find<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
        docs.iter()
            .find(|d| {
                d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name)
            })
            .unwrap_or_else(|| panic!("no {kind}/{name} in {docs:?}"))
    }

    const DEPLOYMENT: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels:
    app: web
spec:
  replicas: 3
  template:
    spec:
      initContainers:
        - name: init
          image: app:1.0
      containers:
        - name: main
          image: app:1.0
          command: [serve, --port, \"80\"]
          env:
            - name: A
              value: a
            - name: B
              value: b
            - name: C
              value: c
          ports:
            - name: http
              containerPort: 80
        - name: sidecar
          image: app-sidecar:2.0
";

    const SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  ports:
    - name: http
      port: 80
";

    fn base() -> Vec<(&'static str, &'static str)> {
        vec![
            (
                "base/kustomization.yaml",
                "resources:\n  - deployment.yaml\n  - service.yaml\n",
            ),
            ("base/deployment.yaml", DEPLOYMENT),
            ("base/service.yaml", SERVICE),
        ]
    }

    fn overlay(
        kustomization: &'static str,
        patches: &[(&'static str, &'static str)],
    ) -> tempfile::TempDir {
        let mut files = base();
        files.push(("overlay/kustomization.yaml", kustomization));
        for (name, text) in patches {
            files.push((name, text));
        }
        tree(&files)
    }

    #[test]
    fn base_resources_render_in_order_and_unchanged() {
        let dir = tree(&base());
        let docs = render(&dir, "base").unwrap();
        assert_eq!(docs, vec![yaml(DEPLOYMENT), yaml(SERVICE)]);
    }

    #[test]
    fn a_patch_changes_a_container_s_image_and_one_env_var_by_name_and_keeps_the_rest() {
        let dir = overlay(
            "resources:\n  - ../base\npatches:\n  - path: p.yaml\n",
            &[(
                "overlay/p.yaml",
                "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  template:
    spec:
      containers:
        - name: main
          image: app:2.0
          env:
            - name: B
              value: patched
",
            )],
        );
        let docs = render(&dir, "overlay").unwrap();
        let spec = &find(&docs, "Deployment", "web")["spec"]["template"]["spec"];
        let containers = spec["containers"].as_vec().unwrap();
        assert_eq!(containers.len(), 2, "{containers:?}");
        let main = &containers[0];
        assert_eq!(main["name"].as_str(), Some("main"));
        assert_eq!(main["image"].as_str(), Some("app:2.0"));
        // B merged in place of the patch's element first, then the others in their order
        // (kustomize's order, seen with kubectl kustomize v5.5.0).
        let env: Vec<(&str, &str)> = main["env"]
            .as_vec()
            .unwrap()
            .iter()
            .map(|v| (v["name"].as_str().unwrap(), v["value"].as_str().unwrap()))
            .collect();
        assert_eq!(env, [("B", "patched"), ("A", "a"), ("C", "c")]);
        // Untouched fields of the patched container stay.
        assert_eq!(main["ports"][0]["containerPort"].as_i64(), Some(80));
        assert_eq!(main["command"][0].as_str(), Some("serve"));
        assert_eq!(containers[1]["name"].as_str(), Some("sidecar"));
        assert_eq!(containers[1]["image"].as_str(), Some("app-sidecar:2.0"));
        assert_eq!(spec["initContainers"][0]["image"].as_str(), Some("app:1.0"));
        assert_eq!(
            find(&docs, "Deployment", "web")["spec"]["replicas"].as_i64(),
            Some(3)
        );
    }

    #[test]
    fn a_container_s_command_is_replaced_and_its_ports_merge_by_container_port() {
        let dir = overlay(
            "resources:\n  - ../base\npatches:\n  - path: p.yaml\n",
            &[(
                "overlay/p.yaml",
                "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  template:
    spec:
      containers:
        - name: main
          command: [serve]
          ports:
            - name: web
              containerPort: 80
            - name: metrics
              containerPort: 9090
",
            )],
        );
        let docs = render(&dir, "overlay").unwrap();
        let main = &find(&docs, "Deployment", "web")["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(main["command"], yaml("[serve]"));
        assert_eq!(
            main["ports"],
            yaml("[{name: web, containerPort: 80}, {name: metrics, containerPort: 9090}]")
        );
    }

    #[test]
    fn a_patch_sets_replicas_deletes_with_null_and_adds_a_label() {
        let dir = overlay(
            "resources:\n  - ../base\npatches:\n  - path: replicas.yaml\n",
            &[(
                "overlay/replicas.yaml",
                "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels:
    tier: front
spec:
  replicas: 5
  template:
    spec:
      initContainers: null
",
            )],
        );
        let docs = render(&dir, "overlay").unwrap();
        let web = find(&docs, "Deployment", "web");
        assert_eq!(web["spec"]["replicas"].as_i64(), Some(5));
        assert_eq!(web["metadata"]["labels"]["app"].as_str(), Some("web"));
        assert_eq!(web["metadata"]["labels"]["tier"].as_str(), Some("front"));
        assert!(web["spec"]["template"]["spec"]["initContainers"].is_badvalue());
        assert_eq!(
            web["spec"]["template"]["spec"]["containers"]
                .as_vec()
                .unwrap()
                .len(),
            2
        );
        // The other resource is untouched.
        assert_eq!(find(&docs, "Service", "web"), &yaml(SERVICE));
    }

    #[test]
    fn several_patches_in_one_file_each_find_their_resource() {
        let dir = overlay(
            "resources:\n  - ../base\npatches:\n  - path: p.yaml\n",
            &[(
                "overlay/p.yaml",
                "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 1
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  type: NodePort
",
            )],
        );
        let docs = render(&dir, "overlay").unwrap();
        assert_eq!(
            find(&docs, "Deployment", "web")["spec"]["replicas"].as_i64(),
            Some(1)
        );
        assert_eq!(
            find(&docs, "Service", "web")["spec"]["type"].as_str(),
            Some("NodePort")
        );
        // The Service's ports list, not in the patch, stays.
        assert_eq!(
            find(&docs, "Service", "web")["spec"]["ports"][0]["port"].as_i64(),
            Some(80)
        );
    }

    #[test]
    fn a_target_matched_json_patch_changes_only_its_target() {
        let dir = overlay(
            "\
resources:
  - ../base
patches:
  - path: port.yaml
    target:
      version: v1
      kind: Service
      name: web
",
            &[(
                "overlay/port.yaml",
                "- op: replace\n  path: /spec/ports/0/port\n  value: 8080\n",
            )],
        );
        let docs = render(&dir, "overlay").unwrap();
        assert_eq!(
            find(&docs, "Service", "web")["spec"]["ports"][0]["port"].as_i64(),
            Some(8080)
        );
        assert_eq!(
            find(&docs, "Deployment", "web")["spec"]["template"]["spec"]["containers"][0]["ports"]
                [0]["containerPort"]
                .as_i64(),
            Some(80)
        );
    }

    #[test]
    fn a_target_matched_strategic_merge_patch_applies_to_every_selected_resource() {
        let dir = overlay(
            "\
resources:
  - ../base
patches:
  - path: labels.yaml
    target:
      name: w.b
",
            &[(
                "overlay/labels.yaml",
                "\
apiVersion: v1
kind: Anything
metadata:
  name: ignored
  labels:
    team: uploads
",
            )],
        );
        let docs = render(&dir, "overlay").unwrap();
        for kind in ["Deployment", "Service"] {
            let doc = find(&docs, kind, "web");
            assert_eq!(
                doc["metadata"]["labels"]["team"].as_str(),
                Some("uploads"),
                "{kind}"
            );
        }
        assert_eq!(
            find(&docs, "Deployment", "web")["apiVersion"].as_str(),
            Some("apps/v1")
        );
    }

    #[test]
    fn a_target_or_patch_matching_nothing_is_an_error() {
        let dir = overlay(
            "\
resources:
  - ../base
patches:
  - path: port.yaml
    target:
      kind: Service
      name: api
",
            &[(
                "overlay/port.yaml",
                "- op: replace\n  path: /spec/type\n  value: x\n",
            )],
        );
        let err = render(&dir, "overlay").unwrap_err();
        assert!(err.contains("matches no resource"), "{err}");

        let dir = overlay(
            "resources:\n  - ../base\npatches:\n  - path: p.yaml\n",
            &[(
                "overlay/p.yaml",
                "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: api\nspec:\n  replicas: 1\n",
            )],
        );
        let err = render(&dir, "overlay").unwrap_err();
        assert!(err.contains("no resource matches"), "{err}");

        let dir = overlay(
            "\
resources:
  - ../base
patches:
  - path: port.yaml
    target:
      kind: Service
",
            &[(
                "overlay/port.yaml",
                "- op: replace\n  path: /spec/clusterIP\n  value: None\n",
            )],
        );
        let err = render(&dir, "overlay").unwrap_err();
        assert!(err.contains("/spec/clusterIP does not exist"), "{err}");
    }

    #[test]
    fn images_rewrite_matching_container_and_init_container_images_only() {
        let dir = overlay(
            "\
resources:
  - ../base
images:
  - name: app
    newName: registry.example.com/app
    newTag: 3.1.4
",
            &[],
        );
        let docs = render(&dir, "overlay").unwrap();
        let spec = &find(&docs, "Deployment", "web")["spec"]["template"]["spec"];
        assert_eq!(
            spec["containers"][0]["image"].as_str(),
            Some("registry.example.com/app:3.1.4")
        );
        assert_eq!(
            spec["initContainers"][0]["image"].as_str(),
            Some("registry.example.com/app:3.1.4")
        );
        // `app` is not a prefix match of `app-sidecar`.
        assert_eq!(
            spec["containers"][1]["image"].as_str(),
            Some("app-sidecar:2.0")
        );
    }

    #[test]
    fn image_references_rewrite_as_kustomize_rewrites_them() {
        let image = |new_name: Option<&str>, new_tag: Option<&str>| Image {
            name: "app".to_owned(),
            new_name: new_name.map(str::to_owned),
            new_tag: new_tag.map(str::to_owned),
        };
        let renamed = image(Some("r.example/app"), None);
        assert_eq!(renamed.rewrite("app").as_deref(), Some("r.example/app"));
        assert_eq!(renamed.rewrite("app:1").as_deref(), Some("r.example/app:1"));
        assert_eq!(
            renamed.rewrite("app:1@sha256:ab").as_deref(),
            Some("r.example/app:1@sha256:ab")
        );
        assert_eq!(
            renamed.rewrite("app@sha256:ab").as_deref(),
            Some("r.example/app@sha256:ab")
        );
        let tagged = image(None, Some("2"));
        assert_eq!(tagged.rewrite("app:1@sha256:ab").as_deref(), Some("app:2"));
        assert_eq!(tagged.rewrite("app").as_deref(), Some("app:2"));
        for other in ["apps", "app-x:1", "my/app", "app:1/x", "app@md5:1"] {
            assert_eq!(tagged.rewrite(other), None, "{other}");
        }
    }

    #[test]
    fn namespace_applies_to_namespaced_resources_and_patches_still_find_them() {
        let dir = tree(&[
            (
                "base/kustomization.yaml",
                "namespace: prod\nresources:\n  - all.yaml\n",
            ),
            (
                "base/all.yaml",
                "\
apiVersion: v1
kind: Namespace
metadata:
  name: anything
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: config
  namespace: elsewhere
data:
  A: a
---
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: monitor
",
            ),
            (
                "overlay/kustomization.yaml",
                "resources:\n  - ../base\npatches:\n  - path: monitor.yaml\n",
            ),
            (
                "overlay/monitor.yaml",
                "\
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: monitor
  labels:
    release: x
",
            ),
        ]);
        let docs = render(&dir, "overlay").unwrap();
        let namespace = find(&docs, "Namespace", "prod");
        assert!(
            namespace["metadata"]["namespace"].is_badvalue(),
            "{namespace:?}"
        );
        assert_eq!(
            find(&docs, "ConfigMap", "config")["metadata"]["namespace"].as_str(),
            Some("prod")
        );
        let monitor = find(&docs, "ServiceMonitor", "monitor");
        assert_eq!(monitor["metadata"]["namespace"].as_str(), Some("prod"));
        assert_eq!(monitor["metadata"]["labels"]["release"].as_str(), Some("x"));

        // A resource first in another namespace is not found by a patch without one.
        let dir = tree(&[
            (
                "base/kustomization.yaml",
                "namespace: prod\nresources:\n  - cm.yaml\n",
            ),
            (
                "base/cm.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n  namespace: other\n",
            ),
            (
                "overlay/kustomization.yaml",
                "resources:\n  - ../base\npatches:\n  - path: p.yaml\n",
            ),
            (
                "overlay/p.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata:\n  A: b\n",
            ),
        ]);
        let err = render(&dir, "overlay").unwrap_err();
        assert!(err.contains("no resource matches"), "{err}");
    }

    #[test]
    fn unimplemented_fields_and_directives_are_refused_by_name() {
        let refused = |kustomization: &'static str, patch: &'static str, expected: &str| {
            let dir = overlay(kustomization, &[("overlay/p.yaml", patch)]);
            let err = render(&dir, "overlay").unwrap_err();
            assert!(err.contains(expected), "expected {expected:?} in: {err}");
        };
        let smp = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n";
        refused(
            "resources:\n  - ../base\ncommonLabels:\n  a: b\n",
            smp,
            "field `commonLabels`",
        );
        refused(
            "resources:\n  - ../base\nconfigMapGenerator:\n  - name: x\n",
            smp,
            "field `configMapGenerator`",
        );
        refused(
            "resources:\n  - ../base\npatches:\n  - patch: |\n      x: y\n",
            smp,
            "field `patch`",
        );
        refused(
            "resources:\n  - ../base\npatches:\n  - path: p.yaml\n    target:\n      labelSelector: a=b\n",
            smp,
            "field `labelSelector`",
        );
        refused(
            "resources:\n  - ../base\nimages:\n  - name: app\n    digest: sha256:ab\n",
            smp,
            "field `digest`",
        );
        refused(
            "resources:\n  - ../base\npatches:\n  - path: p.yaml\n",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  $patch: replace\n",
            "$patch",
        );
        refused(
            "resources:\n  - ../base\npatches:\n  - path: p.yaml\n",
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  ports:\n    - name: http\n      port: 81\n",
            "the list spec.ports of a Service",
        );
        refused(
            "resources:\n  - ../base\npatches:\n  - path: p.yaml\n    target:\n      kind: Service\n",
            "- op: add\n  path: /spec/type\n  value: NodePort\n",
            "op add",
        );
        refused(
            "resources:\n  - ../base\npatches:\n  - path: p.yaml\n    target:\n      name: web.*\n",
            smp,
            "'*'",
        );
        refused(
            "resources:\n  - ../base\n  - https://example.com/x.yaml\n",
            smp,
            "remote resources",
        );
        refused("resources:\n  - ../base/deployment.yaml\n", smp, "outside");
    }

    #[test]
    fn a_secret_generator_makes_a_secret_of_its_files_that_patches_and_the_namespace_reach() {
        use base64::Engine as _;
        let dir = tree(&[
            (
                "k/kustomization.yaml",
                "namespace: prod\nresources:\n  - service.yaml\nsecretGenerator:\n  - name: keys\n    files:\n      - keys.toml\n      - other=conf/a.txt\n    options:\n      disableNameSuffixHash: true\npatches:\n  - path: label.yaml\n",
            ),
            ("k/service.yaml", SERVICE),
            ("k/keys.toml", "[[keys]]\nid = \"a\"\n"),
            ("k/conf/a.txt", "A"),
            (
                "k/label.yaml",
                "apiVersion: v1\nkind: Secret\nmetadata:\n  name: keys\n  labels:\n    x: y\n",
            ),
        ]);
        let docs = render(&dir, "k").unwrap();
        assert_eq!(docs.len(), 2);
        let secret = find(&docs, "Secret", "keys");
        assert_eq!(secret["metadata"]["namespace"].as_str(), Some("prod"));
        assert_eq!(secret["metadata"]["labels"]["x"].as_str(), Some("y"));
        assert_eq!(secret["type"].as_str(), Some("Opaque"));
        let decoded = |k: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(secret["data"][k].as_str().unwrap())
                .unwrap()
        };
        assert_eq!(decoded("keys.toml"), b"[[keys]]\nid = \"a\"\n");
        assert_eq!(decoded("other"), b"A");
    }

    #[test]
    fn a_secret_generator_without_a_fixed_name_or_with_a_file_outside_is_refused() {
        let refused = |entry: &str, expected: &str| {
            let kustomization = format!("secretGenerator:\n  - name: keys\n{entry}");
            let dir = tree(&[
                ("k/kustomization.yaml", kustomization.as_str()),
                ("k/keys.toml", "x"),
                ("outside.toml", "x"),
            ]);
            let err = render(&dir, "k").unwrap_err();
            assert!(err.contains(expected), "expected {expected:?} in: {err}");
        };
        refused("    files: [keys.toml]\n", "disableNameSuffixHash");
        let fixed = "    options:\n      disableNameSuffixHash: true\n";
        refused(&format!("    files: [../outside.toml]\n{fixed}"), "outside");
        refused(&format!("    literals: [a=b]\n{fixed}"), "field `literals`");
        refused(
            &format!("    files: [\"bad key=keys.toml\"]\n{fixed}"),
            "not a valid Secret key",
        );
    }

    #[test]
    fn a_resource_listed_twice_is_an_error() {
        let dir = tree(&[
            (
                "k/kustomization.yaml",
                "resources:\n  - a.yaml\n  - b.yaml\n",
            ),
            ("k/a.yaml", SERVICE),
            ("k/b.yaml", SERVICE),
        ]);
        let err = render(&dir, "k").unwrap_err();
        assert!(err.contains("already registered"), "{err}");
    }

    #[test]
    fn emitted_yaml_parses_back_and_canonical_ignores_key_order() {
        let docs = vec![
            yaml(DEPLOYMENT),
            yaml(SERVICE),
            yaml("a: \"off\"\nb: \"1\"\nc: ''\n"),
        ];
        let text = to_yaml(&docs).unwrap();
        assert_eq!(YamlLoader::load_from_str(&text).unwrap(), docs);
        assert_eq!(
            canonical(&yaml("{a: 1, b: [{x: 1, y: 2}]}")),
            canonical(&yaml("{b: [{y: 2, x: 1}], a: 1}"))
        );
        assert_ne!(
            canonical(&yaml("{b: [1, 2]}")),
            canonical(&yaml("{b: [2, 1]}"))
        );
    }
}
