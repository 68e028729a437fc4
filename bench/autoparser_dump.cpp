// llama.cpp's differential analysis of chat templates (common/chat-diff-analyzer.cpp), as JSON:
// the markers it reads off each template given on the command line. Its output for llama.cpp's
// vendored templates is tests/data/autoparser-analysis.json, which tests/test_tagged_tool_calls.py
// holds engine/tagged_tool_calls.py's analysis to.
//
// Built against a llama.cpp build tree (the llama-cpp-python 0.3.36 sdist's, configured with
// -DLLAMA_BUILD_TESTS=ON so that libllama-common is built):
//   L=.../vendor/llama.cpp B=.../build
//   c++ -O1 -std=c++17 -DGGML_SHARED -DLLAMA_SHARED -I$L/include -I$L/ggml/include -I$L/common -I$L/vendor \
//       bench/autoparser_dump.cpp -o autoparser_dump -Wl,-rpath,$B/bin $B/bin/libllama-common.so \
//       $B/bin/libllama.so $B/bin/libggml.so $B/bin/libggml-base.so $B/common/libllama-common-base.a
//   (cd $L/models/templates && autoparser_dump *.jinja) > analysis.json
//   python3 bench/autoparser_dump.py analysis.json > tests/data/autoparser-analysis.json
#include "chat-auto-parser.h"
#include "chat.h"
#include <fstream>
#include <sstream>
#include <iostream>
using json = common_json;
int main(int argc, char ** argv) {
    json out = json::object();
    for (int i = 1; i < argc; i++) {
        std::ifstream f(argv[i]); std::stringstream ss; ss << f.rdbuf();
        json r;
        try {
            common_chat_template tmpl(ss.str(), "", "");
            autoparser::autoparser a;
            a.analyze_template(tmpl);
            auto s = [](auto m){ std::ostringstream o; o << m; return o.str(); };
            r = {
              {"user_start", a.user_start}, {"assistant_start", a.assistant_start},
              {"reasoning_mode", s(a.reasoning.mode)}, {"reasoning_start", a.reasoning.start}, {"reasoning_end", a.reasoning.end},
              {"content_mode", s(a.content.mode)}, {"content_start", a.content.start}, {"content_end", a.content.end},
              {"tool_mode", s(a.tools.format.mode)},
              {"section_start", a.tools.format.section_start}, {"section_end", a.tools.format.section_end},
              {"per_call_start", a.tools.format.per_call_start}, {"per_call_end", a.tools.format.per_call_end},
              {"name_prefix", a.tools.function.name_prefix}, {"name_suffix", a.tools.function.name_suffix},
              {"args_separator", a.tools.function.args_separator}, {"close", a.tools.function.close},
              {"call_id_prefix", a.tools.call_id.prefix}, {"call_id_suffix", a.tools.call_id.suffix}, {"call_id_pos", s(a.tools.call_id.pos)},
              {"args_start", a.tools.arguments.start}, {"args_end", a.tools.arguments.end},
              {"arg_name_prefix", a.tools.arguments.name_prefix}, {"arg_name_suffix", a.tools.arguments.name_suffix},
              {"arg_value_prefix", a.tools.arguments.value_prefix}, {"arg_value_suffix", a.tools.arguments.value_suffix},
              {"arg_separator", a.tools.arguments.separator}, {"tolerate_ws", a.tools.arguments.tolerate_intertag_whitespace},
              {"preserved", a.preserved_tokens}, {"additional_stops", a.additional_stops},
            };
        } catch (const std::exception & e) { r = {{"error", e.what()}}; }
        std::string name = argv[i]; name = name.substr(name.rfind('/') + 1);
        out[name] = r;
    }
    std::cout << out.dump(1) << std::endl;
}
