//! Upload ids and tenants: `UploadId::parse`, `UploadId::new`, `UploadId::from_key`,
//! `Tenant::parse`.
//!
//! Input: text; before the first newline a tenant, after it a name (no newline: the whole
//! input is the name and a key, the tenant `acme`). Every function is tried on the pieces and
//! on the whole. Properties of anything accepted: a key or name never contains path, glob,
//! Redis hash-tag or separator syntax (`/ . { } * : \`, and `~` in a name or tenant); keys
//! round-trip (`from_key(id.as_str()) == id`, and a key read back is the text it was read
//! from); `new(tenant, name)` keeps the name and the tenant, and the default tenant's keys
//! are bare names while any other tenant's are `tenant~name`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use stitch_common::id::{MAX_ID_LEN, MAX_TENANT_LEN, Tenant, UploadId};

const FORBIDDEN: [char; 7] = ['/', '.', '{', '}', '*', ':', '\\'];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (tenant, name) = text.split_once('\n').unwrap_or(("acme", text));

    let parsed_tenant = Tenant::parse(tenant);
    if let Ok(t) = &parsed_tenant {
        assert_eq!(t.as_str(), tenant);
        assert!(!tenant.is_empty() && tenant.len() <= MAX_TENANT_LEN);
        assert!(
            !tenant.contains(FORBIDDEN) && !tenant.contains('~'),
            "{tenant:?}"
        );
        assert_eq!(t.is_default(), tenant == Tenant::DEFAULT);
    }

    for candidate in [name, text, tenant] {
        if let Ok(id) = UploadId::parse(candidate) {
            check_id(&id);
            assert_eq!(
                id.as_str(),
                candidate,
                "a default-tenant key is the bare name"
            );
            assert_eq!(id.name(), candidate);
            assert!(id.tenant().is_default());
        }
        if let Ok(id) = UploadId::from_key(candidate) {
            check_id(&id);
            assert_eq!(id.as_str(), candidate, "a key reads back as itself");
        }
    }

    let tenants = [parsed_tenant.ok(), Some(Tenant::default_tenant())];
    for tenant in tenants.iter().flatten() {
        match UploadId::new(tenant, name) {
            Ok(id) => {
                check_id(&id);
                assert_eq!(id.name(), name);
                assert_eq!(&id.tenant(), tenant);
                if tenant.is_default() {
                    assert_eq!(id.as_str(), name);
                } else {
                    assert_eq!(id.as_str(), format!("{tenant}~{name}"));
                }
                // The same name is accepted in every tenant, or in none.
                assert!(UploadId::parse(name).is_ok());
            }
            Err(_) => assert!(UploadId::parse(name).is_err()),
        }
    }
});

fn check_id(id: &UploadId) {
    let (key, name) = (id.as_str(), id.name());
    assert!(!key.contains(FORBIDDEN), "{id:?}");
    assert!(!name.is_empty() && name.len() <= MAX_ID_LEN, "{id:?}");
    assert!(!name.contains(FORBIDDEN) && !name.contains('~'), "{id:?}");
    assert!(key.ends_with(name));
    assert_eq!(UploadId::from_key(key).as_ref(), Ok(id));
    assert_eq!(UploadId::new(&id.tenant(), name).as_ref(), Ok(id));
}
