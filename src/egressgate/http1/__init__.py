"""Sans-IO HTTP/1.x for a forward proxy: parse heads with llhttp (via httptools), rewrite
headers for forwarding, build error responses. Nothing here touches a socket."""
