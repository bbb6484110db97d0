// Reference reverse proxy for the benchmark: the same job as ours, done the plain Go way.
//
//	refproxy -addr 127.0.0.1:0 -tokens tokens.json [-poll 1s] [-quiet] [-parent-pid N]
//
// Reads the token table file (common/tokentable.py format: tokens -> ai_model_api_url +
// ai_model_api_key) at start and again whenever its mtime, size or inode changes (checked every
// -poll). The client token (Authorization: Bearer, bare Authorization, or x-api-key) picks the
// upstream; the request goes to api_url + path with the upstream key as "Authorization: Bearer",
// through httputil.ReverseProxy with FlushInterval -1 (every write flushed: SSE is never held).
// WebSocket upgrades are relayed by ReverseProxy (statusWriter keeps http.Hijacker reachable).
// One access line per request on stdout, like ours. Prints "ready <port>". Standard library only.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

type route struct {
	target *url.URL
	key    string
}

type tableFile struct {
	Tokens map[string]struct {
		URL string `json:"ai_model_api_url"`
		Key string `json:"ai_model_api_key"`
	} `json:"tokens"`
}

var table atomic.Value // map[string]*route

func load(path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var f tableFile
	if err := json.Unmarshal(data, &f); err != nil {
		return err
	}
	urls := map[string]*url.URL{}
	routes := make(map[string]*route, len(f.Tokens))
	for token, row := range f.Tokens {
		u, ok := urls[row.URL]
		if !ok {
			if u, err = url.Parse(row.URL); err != nil {
				return err
			}
			urls[row.URL] = u
		}
		routes[token] = &route{target: u, key: row.Key}
	}
	table.Store(routes)
	log.Printf(`{"event":"table_loaded","tokens":%d}`, len(routes))
	return nil
}

func watch(path string, every time.Duration) {
	var last [3]int64
	for ; ; time.Sleep(every) {
		var st syscall.Stat_t
		if syscall.Stat(path, &st) != nil {
			continue
		}
		now := [3]int64{st.Mtim.Nano(), st.Size, int64(st.Ino)}
		if now != last {
			if err := load(path); err != nil {
				log.Printf(`{"event":"table_rejected","error":%q}`, err.Error())
			}
			last = now // a bad file is not retried until it changes again
		}
	}
}

func clientToken(r *http.Request) string {
	if a := r.Header.Get("Authorization"); a != "" {
		if len(a) > 7 && strings.EqualFold(a[:7], "bearer ") {
			return strings.TrimSpace(a[7:])
		}
		return strings.TrimSpace(a)
	}
	return r.Header.Get("X-Api-Key")
}

type ctxKey struct{}

type statusWriter struct { // records the status for the access line; keeps Flush and Hijack reachable
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) { w.status = code; w.ResponseWriter.WriteHeader(code) }
func (w *statusWriter) Flush()               { w.ResponseWriter.(http.Flusher).Flush() }

// Hijack: ReverseProxy relays a 101 (WebSocket) only through a ResponseWriter that is an
// http.Hijacker (Go 1.19 asserts the type; without this every upgrade would be a 502).
func (w *statusWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	return w.ResponseWriter.(http.Hijacker).Hijack()
}

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address")
	path := flag.String("tokens", "var/tokens.json", "token table file")
	poll := flag.Duration("poll", time.Second, "how often to check the table file")
	quiet := flag.Bool("quiet", false, "no access log")
	parent := flag.Int("parent-pid", 0, "exit when this parent process is gone")
	flag.Parse()
	log.SetFlags(0)
	log.SetOutput(os.Stdout)
	if err := load(*path); err != nil {
		log.Fatalf("cannot load %s: %v", *path, err)
	}
	go watch(*path, *poll)
	go func() {
		for range time.Tick(500 * time.Millisecond) {
			if *parent > 0 && os.Getppid() != *parent {
				os.Exit(0)
			}
		}
	}()
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.Proxy, transport.DisableCompression = nil, true
	transport.MaxIdleConns, transport.MaxIdleConnsPerHost = 0, 1000 // like ours: a pool per upstream host
	proxy := &httputil.ReverseProxy{
		FlushInterval: -1,
		Transport:     transport,
		Director: func(r *http.Request) {
			rt := r.Context().Value(ctxKey{}).(*route)
			r.URL.Scheme, r.URL.Host = rt.target.Scheme, rt.target.Host
			r.URL.Path = strings.TrimRight(rt.target.Path, "/") + "/" + strings.TrimLeft(r.URL.Path, "/")
			r.URL.RawPath = ""
			r.Host = rt.target.Host
			r.Header.Del("X-Api-Key")
			r.Header.Set("Authorization", "Bearer "+rt.key)
		},
	}
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w, status: 200}
		rt := table.Load().(map[string]*route)[clientToken(r)]
		if rt == nil {
			sw.Header().Set("Content-Type", "application/json")
			sw.WriteHeader(http.StatusUnauthorized)
			fmt.Fprint(sw, `{"error":{"message":"invalid token","type":"invalid_request_error","code":"invalid_token"}}`)
		} else {
			proxy.ServeHTTP(sw, r.WithContext(context.WithValue(r.Context(), ctxKey{}, rt)))
		}
		if !*quiet {
			log.Printf(`{"logger":"access","method":%q,"path":%q,"status":%d,"latency_ms":%.3f}`,
				r.Method, r.URL.Path, sw.status, float64(time.Since(start).Microseconds())/1000)
		}
	})
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Fprintf(os.Stderr, "ready %d\n", ln.Addr().(*net.TCPAddr).Port)
	log.Fatal((&http.Server{Handler: handler, ReadHeaderTimeout: 60 * time.Second}).Serve(ln))
}
