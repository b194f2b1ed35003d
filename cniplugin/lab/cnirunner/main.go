// cnirunner drives one CNI network list through libcni (Debian's 1.1.2), the way a
// container runtime does: ADD/CHECK/DEL with libcni's result cache, prevResult
// injection and reverse-order DEL.  libcni 1.1.2 predates GC and STATUS, so those two
// are emulated the way libcni HEAD does them (DEL of stale cached attachments, then the
// GC/STATUS command sent to every plugin of a >= 1.1.0 list).
//
// Output contract (parsed by cniplugin/lab/runtime.py):
//   - success: add prints the result JSON; other commands print nothing; exit 0
//   - failure: one JSON line {"code","msg","details","error"} on stdout; exit 1
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/ioutil"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
)

// attachment is one entry of cni.dev/valid-attachments.
type attachment struct {
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifname"`
}

// fail prints the error as one JSON line and exits 1.  A plugin's own typed error
// (wrapped by libcni with "plugin X failed (add): ...") keeps its code.
func fail(err error) {
	out := map[string]interface{}{"code": 0, "msg": err.Error(), "error": err.Error()}
	var cniErr *types.Error
	if errors.As(err, &cniErr) {
		out["code"] = cniErr.Code
		out["msg"] = cniErr.Msg
		out["details"] = cniErr.Details
	}
	line, _ := json.Marshal(out)
	fmt.Println(string(line))
	os.Exit(1)
}

// parseArgs turns "K=V;K2=V2" into libcni's RuntimeConf.Args (order kept, duplicates kept).
func parseArgs(s string) ([][2]string, error) {
	var pairs [][2]string
	for _, item := range strings.Split(s, ";") {
		if item == "" {
			continue
		}
		kv := strings.SplitN(item, "=", 2)
		if len(kv) != 2 || kv[0] == "" {
			return nil, fmt.Errorf("invalid -args pair %q (want K=V)", item)
		}
		pairs = append(pairs, [2]string{kv[0], kv[1]})
	}
	return pairs, nil
}

// pluginArgs builds the environment of an attachment-less command (GC, STATUS): libcni
// HEAD passes an empty RuntimeConf, so every CNI_* variable but CNI_COMMAND/CNI_PATH is empty.
func pluginArgs(command string, path []string) *invoke.Args {
	return &invoke.Args{Command: command, Path: strings.Join(path, string(os.PathListSeparator))}
}

// execEach sends command to every plugin of the list with extra keys injected.
func execEach(ctx context.Context, cfg *libcni.CNIConfig, list *libcni.NetworkConfigList, command string, extra map[string]interface{}) error {
	exec := &invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: os.Stderr}, PluginDecoder: version.PluginDecoder{}}
	for _, net := range list.Plugins {
		inject := map[string]interface{}{"name": list.Name, "cniVersion": list.CNIVersion}
		for k, v := range extra {
			inject[k] = v
		}
		conf, err := libcni.InjectConf(net, inject)
		if err != nil {
			return err
		}
		pluginPath, err := exec.FindInPath(net.Network.Type, cfg.Path)
		if err != nil {
			return err
		}
		if err := invoke.ExecPluginWithoutResult(ctx, pluginPath, conf.Bytes, pluginArgs(command, cfg.Path), exec); err != nil {
			return fmt.Errorf("plugin type=%q failed (%s): %w", net.Network.Type, strings.ToLower(command), err)
		}
	}
	return nil
}

// gc mirrors libcni HEAD's GCNetworkList: DEL every cached attachment of this network
// that is not valid, then (spec >= 1.1.0) send GC with the valid list to every plugin.
func gc(ctx context.Context, cfg *libcni.CNIConfig, list *libcni.NetworkConfigList, cacheDir string, valid []attachment) error {
	keep := map[string]bool{}
	for _, a := range valid {
		keep[a.ContainerID+"/"+a.IfName] = true
	}
	files, _ := filepath.Glob(filepath.Join(cacheDir, "results", "*"))
	for _, f := range files {
		raw, err := ioutil.ReadFile(f)
		if err != nil {
			continue
		}
		var cached struct {
			ContainerID    string                 `json:"containerId"`
			IfName         string                 `json:"ifName"`
			NetworkName    string                 `json:"networkName"`
			CniArgs        [][2]string            `json:"cniArgs"`
			CapabilityArgs map[string]interface{} `json:"capabilityArgs"`
		}
		if json.Unmarshal(raw, &cached) != nil || cached.NetworkName != list.Name || keep[cached.ContainerID+"/"+cached.IfName] {
			continue
		}
		rt := &libcni.RuntimeConf{ContainerID: cached.ContainerID, IfName: cached.IfName,
			Args: cached.CniArgs, CapabilityArgs: cached.CapabilityArgs, CacheDir: cacheDir}
		if err := cfg.DelNetworkList(ctx, list, rt); err != nil {
			return err
		}
	}
	if ok, _ := version.GreaterThanOrEqualTo(list.CNIVersion, "1.1.0"); !ok {
		return nil
	}
	if valid == nil {
		valid = []attachment{}
	}
	return execEach(ctx, cfg, list, "GC", map[string]interface{}{
		"cni.dev/valid-attachments": valid, "cni.dev/attachments": valid})
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: cnirunner add|check|del|gc|status -conflist FILE -netns PATH -ifname IF -id ID -cache DIR [-args K=V;..] [-capargs JSON] [-valid JSON]")
		os.Exit(2)
	}
	command := os.Args[1]
	fs := flag.NewFlagSet(command, flag.ExitOnError)
	conflist := fs.String("conflist", "", "network configuration list file")
	netns := fs.String("netns", "", "netns path (CNI_NETNS)")
	ifname := fs.String("ifname", "eth0", "interface name (CNI_IFNAME)")
	id := fs.String("id", "", "container id (CNI_CONTAINERID)")
	cacheDir := fs.String("cache", "", "libcni cache dir")
	cniArgs := fs.String("args", "", "CNI_ARGS as K=V;K=V")
	capArgs := fs.String("capargs", "", "capability args JSON object")
	validArgs := fs.String("valid", "", "gc: JSON list of {containerID, ifname}")
	_ = fs.Parse(os.Args[2:])

	list, err := libcni.ConfListFromFile(*conflist)
	if err != nil {
		fail(err)
	}
	pairs, err := parseArgs(*cniArgs)
	if err != nil {
		fail(err)
	}
	rt := &libcni.RuntimeConf{ContainerID: *id, NetNS: *netns, IfName: *ifname, Args: pairs, CacheDir: *cacheDir}
	if *capArgs != "" {
		if err := json.Unmarshal([]byte(*capArgs), &rt.CapabilityArgs); err != nil {
			fail(fmt.Errorf("invalid -capargs: %w", err))
		}
	}
	// libcni passes its own environment to plugins, so ROUTE_TUNE_* set by the caller reach them.
	cfg := libcni.NewCNIConfigWithCacheDir(filepath.SplitList(os.Getenv("CNI_PATH")), *cacheDir, nil)
	ctx := context.Background()

	switch command {
	case "add":
		result, err := cfg.AddNetworkList(ctx, list, rt)
		if err != nil {
			fail(err)
		}
		out, err := json.Marshal(result)
		if err != nil {
			fail(err)
		}
		fmt.Println(string(out))
	case "check":
		err = cfg.CheckNetworkList(ctx, list, rt)
	case "del":
		err = cfg.DelNetworkList(ctx, list, rt)
	case "gc":
		var valid []attachment
		if *validArgs != "" {
			if err := json.Unmarshal([]byte(*validArgs), &valid); err != nil {
				fail(fmt.Errorf("invalid -valid: %w", err))
			}
		}
		err = gc(ctx, cfg, list, *cacheDir, valid)
	case "status":
		if ok, _ := version.GreaterThanOrEqualTo(list.CNIVersion, "1.1.0"); ok {
			err = execEach(ctx, cfg, list, "STATUS", nil)
		}
	default:
		err = fmt.Errorf("unknown command %q", command)
	}
	if err != nil {
		fail(err)
	}
}
