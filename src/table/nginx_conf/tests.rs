use super::*;
use std::collections::BTreeMap;

fn args(line: &str) -> Vec<String> {
    line.split(' ').map(str::to_owned).collect()
}

#[test]
fn options_are_read_as_nginx_reads_them() {
    let cmd = command_line(&args("nginx -p /srv/ -c conf/a.conf -g daemon_off;"));
    assert_eq!(cmd.conf.as_deref(), Some("conf/a.conf"));
    assert_eq!(cmd.globals.as_deref(), Some("daemon_off;"));
    let cmd = command_line(&args("nginx -tq -c/etc/b.conf -s reload"));
    assert_eq!(cmd.conf.as_deref(), Some("/etc/b.conf"));
    let cmd = command_line(&args("nginx -qc /etc/c.conf"));
    assert_eq!(cmd.conf.as_deref(), Some("/etc/c.conf"));
    assert_eq!(command_line(&args("nginx")), CommandLine::default());
    assert_eq!(
        conf_file(
            &command_line(&args("nginx")),
            "--prefix=/usr/share/nginx --conf-path=/etc/nginx/nginx.conf",
            Path::new("/usr/share/nginx/")
        ),
        Path::new("/etc/nginx/nginx.conf")
    );
    assert_eq!(
        conf_file(&CommandLine::default(), "", Path::new("/opt/nginx/")),
        Path::new("/opt/nginx/conf/nginx.conf")
    );
}

#[test]
fn a_process_title_gives_back_the_arguments() {
    let title = b"nginx: master process /usr/sbin/nginx -p /srv/ -c conf/nginx.conf\0\0\0";
    assert_eq!(
        args_of_cmdline(title),
        args("/usr/sbin/nginx -p /srv/ -c conf/nginx.conf")
    );
    let raw = b"/usr/sbin/nginx\0-c\0/etc/my nginx.conf\0";
    assert_eq!(
        command_line(&args_of_cmdline(raw)).conf.as_deref(),
        Some("/etc/my nginx.conf")
    );
}

fn find(files: &[(&str, &str)], globals: Option<&str>) -> Option<String> {
    let files: BTreeMap<PathBuf, String> = files
        .iter()
        .map(|(p, t)| (PathBuf::from(p), (*t).to_owned()))
        .collect();
    let read = |p: &Path| files.get(p).cloned();
    let list = |dir: &Path| {
        files
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect()
    };
    worker_user(globals, Path::new("/etc/nginx/nginx.conf"), &read, &list)
}

#[test]
fn finds_the_user_of_the_main_context() {
    let debian = "user www-data;\nworker_processes auto;\npid /run/nginx.pid;\n\
                  include /etc/nginx/modules-enabled/*.conf;\nevents { worker_connections 768; }\n";
    assert_eq!(
        find(&[("/etc/nginx/nginx.conf", debian)], None).as_deref(),
        Some("www-data")
    );
    let with_group = "# user nobody;\nuser  \"nginx\" 'web' ;";
    assert_eq!(
        find(&[("/etc/nginx/nginx.conf", with_group)], None).as_deref(),
        Some("nginx")
    );
    // Inside blocks, `user` is something else (or nothing); after them
    // it is still the main context's.
    let late = "events { user no; }\nhttp { server { location / { set $user x; } } }\nuser late;";
    assert_eq!(
        find(&[("/etc/nginx/nginx.conf", late)], None).as_deref(),
        Some("late")
    );
    assert_eq!(
        find(&[("/etc/nginx/nginx.conf", "events {}\n")], None),
        None
    );
    assert_eq!(find(&[], None), None);
    // -g comes first.
    assert_eq!(
        find(&[("/etc/nginx/nginx.conf", debian)], Some("user gee;")).as_deref(),
        Some("gee")
    );
}

#[test]
fn follows_includes_of_the_main_context() {
    let files = [
        (
            "/etc/nginx/nginx.conf",
            "include main.d/*.conf;\nhttp { include users.conf; }\n",
        ),
        ("/etc/nginx/main.d/10-modules.conf", "load_module x.so;\n"),
        ("/etc/nginx/main.d/20-user.conf", "user from-include;\n"),
        ("/etc/nginx/main.d/20-user.conf.bak", "user backup;\n"),
        ("/etc/nginx/users.conf", "user in-http;\n"),
    ];
    assert_eq!(find(&files, None).as_deref(), Some("from-include"));
    let looped = [("/etc/nginx/nginx.conf", "include nginx.conf;\n")];
    assert_eq!(find(&looped, None), None);
}

fn configuration(files: &[(&str, &str)]) -> Result<Configuration, String> {
    let files: BTreeMap<PathBuf, String> = files
        .iter()
        .map(|(p, t)| (PathBuf::from(p), (*t).to_owned()))
        .collect();
    let read = |p: &Path| files.get(p).cloned();
    let list = |dir: &Path| {
        files
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect()
    };
    read_configuration(Path::new("/srv/nginx/nginx.conf"), &read, &list)
}

/// The first document's nginx.conf: servers in the block, with
/// `balancer_by_lua_file` and the health check line.
const UPSOPS: &str = r#"
user nobody;
events {}
http {
lua_shared_dict upstreams 10m;
upstream local {
    server 192.168.56.101:8080;
    server 192.168.56.101:8081 backup;
    server 192.168.56.101:8082;
    balancer_by_lua_file "./ngx_lua/upstream.lua";
    check interval=3000 rise=2 fall=5 timeout=1000;
}
include conf.d/*.conf;
server {
    location /local { proxy_pass http://local; }
    location = /ups { content_by_lua_file "./ngx_lua/upsops.lua"; }
}
}
stream {
upstream local_tcp { server 127.0.0.1:9; }
}
"#;

#[test]
fn reads_the_upstream_blocks_of_http_through_includes() {
    let c = configuration(&[
        ("/srv/nginx/nginx.conf", UPSOPS),
        (
            "/srv/nginx/conf.d/10-api.conf",
            "upstream api {\n  server 127.0.0.1:1;\n  balancer_by_lua_block {\n    local s = \"}\"\n    require(\"ngx.dyups\").balance(\"api\")\n  }\n}\n",
        ),
        ("/srv/nginx/conf.d/20-native.conf", "upstream static { server 127.0.0.1:2; }\n"),
        ("/srv/nginx/conf.d/README", "not a conf file {"),
    ])
    .unwrap();
    let found: Vec<(&str, usize, bool)> = c
        .upstreams
        .iter()
        .map(|b| (b.name.as_str(), b.line, b.balancer))
        .collect();
    // The stream block's upstream is another namespace: not read.
    assert_eq!(
        found,
        [("local", 6, true), ("api", 1, true), ("static", 1, false)]
    );
    assert!(c.upstreams[0].text.starts_with("upstream local {"));
    assert!(c.upstreams[0].text.ends_with('}'));
    assert_eq!(
        c.upstreams[2].file,
        Path::new("/srv/nginx/conf.d/20-native.conf")
    );

    let table = c.balanced_table().unwrap();
    let names: Vec<&str> = table.names().collect();
    assert_eq!(names, ["local", "api"], "the native block is nginx's");
    let local = table.get("local").unwrap();
    assert_eq!(local.servers.len(), 3);
    assert!(local.servers[1].backup);
    assert_eq!(c.native_block("STATIC").map(|b| b.line), Some(1));
    assert!(c.native_block("local").is_none());
}

#[test]
fn a_bad_block_is_named_by_its_file_and_line() {
    let conf = "http {\n  upstream a { server 127.0.0.1:1; balancer_by_lua_file x.lua; }\n  include ups.conf;\n}\n";
    let c = configuration(&[
        ("/srv/nginx/nginx.conf", conf),
        (
            "/srv/nginx/ups.conf",
            "# upstreams\n\nupstream b {\n  balancer_by_lua_file x.lua;\n  server 127.0.0.1:2 weight=0;\n}\n",
        ),
    ])
    .unwrap();
    let err = c.balanced_table().unwrap_err().to_string();
    assert!(err.starts_with("/srv/nginx/ups.conf: line 5: "), "{err}");
    assert!(err.contains("weight"), "{err}");
    // A file nginx would read and cannot.
    let err = configuration(&[("/srv/nginx/nginx.conf", conf)]).unwrap_err();
    assert!(err.contains("/srv/nginx/ups.conf"), "{err}");
    // Lines a block includes are not read: said, not skipped.
    let c = configuration(&[
        (
            "/srv/nginx/nginx.conf",
            "http { upstream a { balancer_by_lua_file x.lua; include servers.conf; } }",
        ),
        ("/srv/nginx/servers.conf", "server 127.0.0.1:1;"),
    ])
    .unwrap();
    let err = c.balanced_table().unwrap_err().to_string();
    assert!(err.contains("not the files it includes"), "{err}");
}

#[test]
fn tells_which_files_nginx_reads() {
    let c = configuration(&[
        ("/srv/nginx/nginx.conf", UPSOPS),
        ("/srv/nginx/conf.d/a.conf", ""),
    ])
    .unwrap();
    let reads = |p: &str| c.reads(Path::new(p));
    assert!(reads("/srv/nginx/nginx.conf")
        .unwrap()
        .contains("configuration file"));
    assert!(reads("/srv/nginx/./nginx.conf").is_some());
    // A file a wildcard would match counts before it exists.
    let why = reads("/srv/nginx/conf.d/dyups.conf").unwrap();
    assert!(why.contains("line 13 of /srv/nginx/nginx.conf"), "{why}");
    assert!(reads("/srv/nginx/conf.d/../conf.d/b.conf").is_some());
    assert_eq!(reads("/srv/nginx/conf.d/b.conf.bak"), None);
    assert_eq!(reads("/srv/nginx/upstream.conf"), None);
    assert_eq!(reads("/srv/nginx/conf.d/.hidden.conf"), None);
}

#[test]
fn braces_in_lua_blocks_do_not_count() {
    let conf = r#"
http {
init_by_lua_block {
    -- } } a comment that would close both blocks
    local s = "}" .. '}' .. [[ } ]] .. [==[ }]] } ]==]
    --[[ and a long
         one } ]]
    if true then ngx.log(ngx.ERR, "{") end
    user "in-lua";
}
content_by_lua_block { ngx.say("}}}") }
}
user after-lua;
"#;
    assert_eq!(
        find(&[("/etc/nginx/nginx.conf", conf)], None).as_deref(),
        Some("after-lua")
    );
}
